//! A real `ddpm-worker serve` process for the service tests, driven through tonic clients.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ddpm_worker::api::pb;
use ddpm_worker::api::pb::worker_client::WorkerClient;
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
        let mut queue = vec![];
        if !args.iter().any(|a| a == "--queue") {
            queue = vec!["--queue".to_string(), format!("sqlite:{}", data.join("queue.sqlite").display())];
        }
        let mut child = Command::new(super::bin())
            .args(["serve", "--listen", "127.0.0.1:0"])
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
        let server = Server { child, url: format!("http://{addr}") };
        server.wait_serving(Duration::from_secs(60)).await;
        server
    }

    pub async fn client(&self) -> WorkerClient<Channel> {
        WorkerClient::connect(self.url.clone()).await.unwrap()
    }

    pub async fn health(&self) -> Option<i32> {
        let channel = tonic::transport::Endpoint::from_shared(self.url.clone()).ok()?.connect().await.ok()?;
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
        let req = tonic_health::pb::HealthCheckRequest { service: String::new() };
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
        model: "tiny".into(),
        sampling: Some(pb::SamplingSpec { scheduler: scheduler as i32, steps, eta: None }),
        num_samples,
        seed: Some(1000),
        batch_size,
        ..Default::default()
    }
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

/// Polls GetJob until `done(job)` holds.
pub async fn wait_for(
    client: &mut WorkerClient<Channel>,
    job_id: &str,
    done: impl Fn(&pb::Job) -> bool,
) -> pb::Job {
    let start = Instant::now();
    loop {
        let job = client.get_job(pb::GetJobRequest { job_id: job_id.into() }).await.unwrap().into_inner();
        if done(&job) {
            return job;
        }
        assert!(start.elapsed() < Duration::from_secs(300), "job stuck: {job:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The PNGs of a finished job on a local store, by sample index, checked against the manifest's hashes.
pub fn job_samples(job: &pb::Job) -> Vec<Vec<u8>> {
    let m = manifest(job);
    let root = job_root(job);
    let samples = m["samples"].as_array().unwrap();
    samples
        .iter()
        .enumerate()
        .map(|(i, s)| {
            assert_eq!(s["index"].as_u64().unwrap(), i as u64, "every index once, in order");
            let bytes = std::fs::read(root.join(s["key"].as_str().unwrap())).unwrap();
            assert_eq!(
                ddpm_worker::digest::sha256_hex(&bytes),
                s["sha256"].as_str().unwrap(),
                "{}",
                s["key"]
            );
            bytes
        })
        .collect()
}

/// The store root that a finished job's manifest keys are relative to.
pub fn job_root(job: &pb::Job) -> PathBuf {
    let m = manifest(job);
    let manifest_path = file_path(&job.manifest_uri);
    // The manifest sits at <root>/<prefix>/<job_id>/manifest.json; keys are relative to <root>.
    let depth = m["samples"][0]["key"].as_str().unwrap().split('/').count() - 2;
    let mut root = manifest_path.parent().unwrap().to_path_buf();
    for _ in 0..depth {
        root.pop();
    }
    root
}

/// Every file under a finished job's folder that its manifest does not account for (samples, grids,
/// shard records and the manifest itself): what crashed, paused or retried writers left behind.
pub fn unlisted_files(job: &pb::Job) -> Vec<PathBuf> {
    let m = manifest(job);
    let root = job_root(job);
    let folder = file_path(&job.manifest_uri).parent().unwrap().to_path_buf();
    let mut listed: std::collections::BTreeSet<PathBuf> = ["samples", "grids"]
        .iter()
        .flat_map(|k| m[*k].as_array().unwrap().iter().map(|e| root.join(e["key"].as_str().unwrap())))
        .collect();
    listed.insert(folder.join("manifest.json"));
    for s in m["shards"].as_array().unwrap() {
        listed.insert(folder.join(format!("shards/{:06}.json", s["shard"].as_u64().unwrap())));
    }
    let mut unlisted = Vec::new();
    let mut stack = vec![folder];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if !listed.contains(&path) {
                unlisted.push(path);
            }
        }
    }
    unlisted
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
    assert_eq!(job_samples(&done).len(), 256);
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
    assert_eq!(job_samples(&done).len(), 256, "every listed SHA-256 is still true");
    assert!(unlisted_files(&done).is_empty(), "left behind: {:?}", unlisted_files(&done));
    let staging = jobs.join(".ddpm-staging");
    let staged: Vec<_> =
        std::fs::read_dir(&staging).map(|d| d.filter_map(Result::ok).collect()).unwrap_or_default();
    assert!(staged.is_empty(), "temporary files left: {staged:?}");
    drop(a);
}
