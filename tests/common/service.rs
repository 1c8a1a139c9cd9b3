//! A real `ddpm-worker serve` process for the service tests, driven through tonic clients.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ddpm_worker::api::pb;
use ddpm_worker::api::pb::worker_service_client::WorkerServiceClient as WorkerClient;
use tonic::transport::Channel;

/// A random-weight tiny model folder under `dir`.
pub fn tiny_model(dir: &Path) -> PathBuf {
    let model = dir.join("tiny-model");
    if !model.join("config.json").exists() {
        let out = Command::new(super::bin())
            .args(["init-model", "--preset", "tiny", "--out", model.to_str().unwrap(), "--seed", "1"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    model
}

pub struct Server {
    pub child: Child,
    pub url: String,
    /// How clients reach a server on TLS (`None`: plaintext).
    pub tls: Option<tonic::transport::ClientTlsConfig>,
}

impl Server {
    /// Starts `serve` with its queue and outputs under `data`, the tiny model as `tiny`, and `extra`
    /// flags; returns once it is healthy (SERVING).
    pub async fn start(data: &Path, extra: &[&str]) -> Server {
        let model = tiny_model(data);
        let mut args = vec![
            "--model".to_string(),
            format!("tiny={}", model.display()),
            "--output".into(),
            format!("file:{}", data.join("jobs").display()),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::start_with(data, &args, &[]).await
    }

    /// Starts `serve` with `args` (models, output…) and `env`; its queue is a SQLite file under `data`
    /// unless `args` name one.
    pub async fn start_with(data: &Path, args: &[String], env: &[(&str, String)]) -> Server {
        Self::launch(data, args, env, None).await
    }

    /// As [`Server::start_with`], for a server on TLS (`args` name its certificate); `tls` is how the
    /// tests' clients (and the health check) connect.
    pub async fn start_tls(
        data: &Path,
        args: &[String],
        env: &[(&str, String)],
        tls: tonic::transport::ClientTlsConfig,
    ) -> Server {
        Self::launch(data, args, env, Some(tls)).await
    }

    /// As [`Server::start`] with `env`, returning as soon as it listens (SERVING or not).
    pub async fn start_listening(data: &Path, extra: &[&str], env: &[(&str, String)]) -> Server {
        let model = tiny_model(data);
        let mut args = vec![
            "--model".to_string(),
            format!("tiny={}", model.display()),
            "--output".into(),
            format!("file:{}", data.join("jobs").display()),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::spawn(data, &args, env, None)
    }

    async fn launch(
        data: &Path,
        args: &[String],
        env: &[(&str, String)],
        tls: Option<tonic::transport::ClientTlsConfig>,
    ) -> Server {
        let server = Self::spawn(data, args, env, tls);
        server.wait_serving(Duration::from_secs(60)).await;
        server
    }

    fn spawn(
        data: &Path,
        args: &[String],
        env: &[(&str, String)],
        tls: Option<tonic::transport::ClientTlsConfig>,
    ) -> Server {
        let mut queue = vec![];
        if !args.iter().any(|a| a == "--queue") {
            queue = vec!["--queue".to_string(), format!("sqlite:{}", data.join("queue.sqlite").display())];
        }
        let listen: &[&str] = if args.iter().any(|a| a == "--listen") {
            &["serve"]
        } else {
            &["serve", "--listen", "127.0.0.1:0"]
        };
        let mut child = Command::new(super::bin())
            .args(listen)
            .args(queue)
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            // Quiet unless asked (DDPM_TEST_LOG=info shows the servers' logs).
            .env("RUST_LOG", std::env::var("DDPM_TEST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("listening on ") {
                    let _ = tx.send(addr.to_string());
                }
            }
        });
        let addr = rx.recv_timeout(Duration::from_secs(60)).expect("the server printed its address");
        let scheme = if tls.is_some() { "https" } else { "http" };
        Server { child, url: format!("{scheme}://{addr}"), tls }
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.url.rsplit(':').next().unwrap().parse().unwrap()
    }

    pub async fn try_channel(&self) -> Result<Channel, tonic::transport::Error> {
        let mut endpoint = tonic::transport::Endpoint::from_shared(self.url.clone())?;
        if let Some(tls) = &self.tls {
            endpoint = endpoint.tls_config(tls.clone())?;
        }
        endpoint.connect().await
    }

    pub async fn client(&self) -> WorkerClient<Channel> {
        WorkerClient::new(self.try_channel().await.unwrap())
    }

    pub async fn health(&self) -> Option<i32> {
        self.health_of("").await
    }

    /// The status of health service `service` ("" readiness, "liveness").
    pub async fn health_of(&self, service: &str) -> Option<i32> {
        let channel = self.try_channel().await.ok()?;
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
        let req = tonic_health::pb::HealthCheckRequest { service: service.into() };
        health.check(req).await.ok().map(|r| r.into_inner().status)
    }

    async fn wait_serving(&self, limit: Duration) {
        let start = Instant::now();
        while start.elapsed() < limit {
            if self.health().await
                == Some(tonic_health::pb::health_check_response::ServingStatus::Serving as i32)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the server did not become SERVING within {limit:?}");
    }

    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the process to exit, at most `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(started.elapsed() < limit, "no exit within {limit:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn request(
    num_samples: u64,
    scheduler: pb::Scheduler,
    steps: u32,
    batch_size: u32,
) -> pb::SubmitJobRequest {
    pb::SubmitJobRequest {
        request_id: String::new(),
        spec: Some(pb::JobSpec {
            model: "tiny".into(),
            sampling: Some(pb::SamplingSpec { scheduler: scheduler as i32, steps, eta: None }),
            num_samples,
            seed: Some(1000),
            batch_size,
            ..Default::default()
        }),
    }
}

/// The spec of a request, to change a field of it.
pub trait SpecMut {
    fn s(&mut self) -> &mut pb::JobSpec;
}

impl SpecMut for pb::SubmitJobRequest {
    fn s(&mut self) -> &mut pb::JobSpec {
        self.spec.get_or_insert_default()
    }
}

/// A job's error message ("" when it has none).
pub fn error_of(job: &pb::Job) -> String {
    job.error.as_ref().map(|e| e.message.clone()).unwrap_or_default()
}

/// Follows WatchJob to the end and returns every event's job.
pub async fn watch(client: &mut WorkerClient<Channel>, job_id: &str) -> Vec<pb::Job> {
    use tokio_stream::StreamExt;
    let mut stream =
        client.watch_job(pb::WatchJobRequest { job_id: job_id.into() }).await.unwrap().into_inner();
    let mut events = Vec::new();
    while let Some(e) =
        tokio::time::timeout(Duration::from_secs(300), stream.next()).await.expect("watch timed out")
    {
        events.push(e.unwrap().job.unwrap());
    }
    events
}

/// GetJob's job.
pub async fn get_job(client: &mut WorkerClient<Channel>, job_id: &str) -> pb::Job {
    client.get_job(pb::GetJobRequest { job_id: job_id.into() }).await.unwrap().into_inner().job.unwrap()
}

/// CancelJob's job.
pub async fn cancel_job(client: &mut WorkerClient<Channel>, job_id: &str) -> pb::Job {
    client.cancel_job(pb::CancelJobRequest { job_id: job_id.into() }).await.unwrap().into_inner().job.unwrap()
}

/// Polls GetJob until `done(job)` holds.
pub async fn wait_for(
    client: &mut WorkerClient<Channel>,
    job_id: &str,
    done: impl Fn(&pb::Job) -> bool,
) -> pb::Job {
    let start = Instant::now();
    loop {
        let job = get_job(client, job_id).await;
        if done(&job) {
            return job;
        }
        assert!(start.elapsed() < Duration::from_secs(300), "job stuck: {job:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The folder of a finished job on a local store.
pub fn job_folder(job: &pb::Job) -> PathBuf {
    file_path(&job.manifest_uri).parent().unwrap().to_path_buf()
}

/// The manifest of a finished job's folder.
fn folder_manifest(folder: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(folder.join("manifest.json")).unwrap()).unwrap()
}

/// The rows of the Parquet index of a finished job's folder, in sample order: each part with its listed
/// SHA-256, each sample once with its seed.
fn folder_index_rows(folder: &Path) -> Vec<ddpm_worker::dataset::index::IndexRow> {
    let m = folder_manifest(folder);
    let mut rows = Vec::new();
    for part in m["index"].as_array().unwrap() {
        let bytes = std::fs::read(folder.join(part["path"].as_str().unwrap())).unwrap();
        assert_eq!(ddpm_worker::digest::sha256_hex(&bytes), part["sha256"].as_str().unwrap());
        rows.extend(ddpm_worker::dataset::index::read(bytes.into()).unwrap());
    }
    rows.sort_by_key(|r| r.index);
    let seed = m["spec"]["seed"].as_u64().unwrap();
    assert_eq!(rows.len() as u64, m["spec"]["num_samples"].as_u64().unwrap());
    for (i, r) in rows.iter().enumerate() {
        assert_eq!((r.index, r.seed), (i as u64, seed + i as u64), "every index once, in order");
    }
    rows
}

/// The encoded samples of a finished job's folder, by sample index, read where its index says they are
/// and checked against the index's SHA-256.
async fn folder_samples(folder: &Path) -> Vec<Vec<u8>> {
    use std::sync::Arc;
    let m = folder_manifest(folder);
    let store: Arc<dyn ddpm_worker::storage::ObjectStore> =
        Arc::new(ddpm_worker::storage::local::LocalStore::new(folder).unwrap());
    let sizes: std::collections::BTreeMap<String, u64> = m["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["path"].as_str().unwrap().to_string(), f["bytes"].as_u64().unwrap()))
        .collect();
    let mut samples = Vec::new();
    for row in folder_index_rows(folder) {
        let bytes = ddpm_worker::dataset::sink::read_sample(&store, "", &row, |p| sizes.get(p).copied())
            .await
            .unwrap();
        assert_eq!(ddpm_worker::digest::sha256_hex(&bytes), row.sha256, "{row:?}");
        samples.push(bytes.to_vec());
    }
    samples
}

/// What a finished job's manifest and index account for (samples, data files, index parts, grids,
/// shard records and the manifest itself), relative to its folder.
fn listed_files(folder: &Path) -> std::collections::BTreeSet<PathBuf> {
    let m = folder_manifest(folder);
    let mut listed: std::collections::BTreeSet<PathBuf> = ["index", "files", "grids", "metadata"]
        .iter()
        .flat_map(|k| m[*k].as_array().unwrap().iter().map(|e| PathBuf::from(e["path"].as_str().unwrap())))
        .collect();
    listed.extend(folder_index_rows(folder).into_iter().map(|r| PathBuf::from(r.file)));
    listed.insert(PathBuf::from("manifest.json"));
    for s in m["shards"].as_array().unwrap() {
        listed.insert(PathBuf::from(format!("shards/{:06}.json", s["shard"].as_u64().unwrap())));
    }
    listed
}

/// Every file under `folder`, relative to it.
fn files_under(folder: &Path) -> std::collections::BTreeSet<PathBuf> {
    let mut present = std::collections::BTreeSet::new();
    let mut stack = vec![folder.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                present.insert(path.strip_prefix(folder).unwrap().to_path_buf());
            }
        }
    }
    present
}

/// The rows of a finished job's Parquet index, in sample order, each index once.
pub fn index_rows(job: &pb::Job) -> Vec<ddpm_worker::dataset::index::IndexRow> {
    folder_index_rows(&job_folder(job))
}

/// The encoded samples of a finished job on a local store, by sample index, checked against the index.
pub async fn job_samples(job: &pb::Job) -> Vec<Vec<u8>> {
    folder_samples(&job_folder(job)).await
}

/// Every file under a finished job's folder that its manifest and index do not account for: what
/// crashed, paused or retried writers left behind.
pub fn unlisted_files(job: &pb::Job) -> Vec<PathBuf> {
    let folder = job_folder(job);
    let listed = listed_files(&folder);
    files_under(&folder).difference(&listed).map(|p| folder.join(p)).collect()
}

/// Checks a finished job's folder (local, or downloaded from S3) as a reader would find it: every
/// index part, data file and grid has its listed SHA-256, the index lists each sample once with the
/// SHA-256 of the bytes where it points, and no file is there that the manifest and index do not list.
/// Returns the encoded samples in index order.
pub async fn check_job_folder(folder: &Path) -> Vec<Vec<u8>> {
    let m = folder_manifest(folder);
    // The dataset card (and a WebDataset's shard index) are listed like the data.
    assert!(m["metadata"].as_array().unwrap().iter().any(|e| e["path"] == "README.md"), "no dataset card");
    for entry in ["index", "files", "grids", "metadata"].iter().flat_map(|k| m[*k].as_array().unwrap()) {
        let path = entry["path"].as_str().unwrap();
        let bytes = std::fs::read(folder.join(path)).unwrap();
        assert_eq!(ddpm_worker::digest::sha256_hex(&bytes), entry["sha256"].as_str().unwrap(), "{path}");
    }
    let samples = folder_samples(folder).await;
    assert_eq!(
        files_under(folder),
        listed_files(folder),
        "files the manifest and index do not list, or listed files missing"
    );
    samples
}

/// Runs the pinned dataset readers (`tests/readers/check_dataset.py`: webdataset, datasets, pyarrow)
/// on a job's folder; `reference` is the `files` layout of the same job, whose PNGs the decoded pixels
/// must equal. Returns the script's JSON summary.
pub fn run_readers(folder: &Path, reference: Option<&Path>) -> serde_json::Value {
    let python = std::env::var("DDPM_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/readers/check_dataset.py");
    let mut cmd = Command::new(python);
    cmd.arg(script).arg(folder);
    if let Some(r) = reference {
        cmd.arg("--reference").arg(r);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "the readers refused {}:\n{}{}",
        folder.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A file as a late writer could change it: its inode (a replacement, even by the same bytes, is a
/// new file) and its bytes.
pub type FileState = (u64, Vec<u8>);

/// Every file under `dir`, by path (to see what a late writer changed).
pub fn snapshot(dir: &Path) -> std::collections::BTreeMap<PathBuf, FileState> {
    use std::os::unix::fs::MetadataExt;
    let mut files = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let inode = std::fs::metadata(&path).unwrap().ino();
                files.insert(path.clone(), (inode, std::fs::read(&path).unwrap()));
            }
        }
    }
    files
}

/// Sends `signal` (e.g. "STOP", "CONT", "TERM") to a process.
pub fn signal(pid: u32, signal: &str) {
    let status =
        std::process::Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status().unwrap();
    assert!(status.success(), "kill -{signal} {pid}");
}

pub fn file_path(uri: &str) -> PathBuf {
    PathBuf::from(uri.strip_prefix("file://").unwrap_or_else(|| panic!("{uri} is not a file URI")))
}

pub fn manifest(job: &pb::Job) -> serde_json::Value {
    let text = std::fs::read_to_string(file_path(&job.manifest_uri)).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The zombie case, on the queue `queue` (`sqlite:PATH` or `nats://…`): worker A is frozen (SIGSTOP)
/// while writing a shard's outputs; worker B, with another UNet layout (so its bytes differ), takes the
/// shard over once A's lease expires and finishes the job; then A resumes. Whatever A still does, no
/// recorded object or shard record may change, every listed SHA-256 must stay true, and nothing the
/// manifest does not list may be left in the job's folder.
pub async fn a_zombie_cannot_change_recorded_outputs(dir: &Path, queue: &str) {
    let model = format!("tiny={}", tiny_model(dir).display());
    let jobs = dir.join("jobs");
    let args = |extra: &[&str]| -> Vec<String> {
        let output = format!("file:{}", jobs.display());
        let mut args: Vec<String> = ["--model", &model, "--output", &output, "--queue", queue]
            .into_iter()
            .chain(["--lease-seconds", "3", "--batches-per-shard", "2", "--cpu-threads", "1"])
            .map(String::from)
            .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    let a = Server::start_with(&dir.join("a"), &args(&[]), &[]).await;
    let mut client = a.client().await;
    // Two shards of two batches of 64: a batch's 64 PNGs are handed to the uploader at once, which
    // writes 8 at a time (each with an fsync), a burst of some milliseconds.
    let job =
        client.submit_job(request(256, pb::Scheduler::Ddim, 30, 64)).await.unwrap().into_inner().job.unwrap();
    assert_eq!(job.shards_total, 2);
    // Freeze A the moment its first PNG lands: most of that batch is still to be written, and A writes
    // it when it resumes, whatever its lease says by then.
    let samples = jobs.join(&job.job_id).join("samples");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let written = std::fs::read_dir(&samples)
            .map(|d| d.filter_map(Result::ok).any(|e| e.file_name().to_string_lossy().ends_with(".png")))
            .unwrap_or(false);
        if written {
            break;
        }
        assert!(Instant::now() < deadline, "A wrote no sample");
    }
    // Directly, not through kill(1): a process start would let the burst finish first.
    // SAFETY: kill(2) on the pid of a child process this test started and still holds.
    assert_eq!(unsafe { libc::kill(a.pid() as libc::pid_t, libc::SIGSTOP) }, 0);
    let b = Server::start_with(&dir.join("b"), &args(&["--channels-last"]), &[]).await;
    let mut client_b = b.client().await;
    let done = wait_for(&mut client_b, &job.job_id, |j| j.state == pb::JobState::Succeeded as i32).await;
    assert_eq!(job_samples(&done).await.len(), 256);
    let folder = jobs.join(&job.job_id);
    let before = snapshot(&folder);

    signal(a.pid(), "CONT");
    // A's heartbeat finds its lease gone within a quarter lease; give it twice the lease to do its worst.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let after = snapshot(&folder);
    for (path, state) in &before {
        assert!(after.get(path) == Some(state), "{} was rewritten after the zombie resumed", path.display());
    }
    assert_eq!(after.len(), before.len(), "the zombie added files");
    assert_eq!(job_samples(&done).await.len(), 256, "every listed SHA-256 is still true");
    assert!(unlisted_files(&done).is_empty(), "left behind: {:?}", unlisted_files(&done));
    let staging = jobs.join(".ddpm-staging");
    let staged: Vec<_> =
        std::fs::read_dir(&staging).map(|d| d.filter_map(Result::ok).collect()).unwrap_or_default();
    assert!(staged.is_empty(), "temporary files left: {staged:?}");
    drop(a);
}
