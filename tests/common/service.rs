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

pub fn file_path(uri: &str) -> PathBuf {
    PathBuf::from(uri.strip_prefix("file://").unwrap_or_else(|| panic!("{uri} is not a file URI")))
}

pub fn manifest(job: &pb::Job) -> serde_json::Value {
    let text = std::fs::read_to_string(file_path(&job.manifest_uri)).unwrap();
    serde_json::from_str(&text).unwrap()
}
