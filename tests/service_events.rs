//! Job events end to end: a webhook receiver (tests/events/receiver.py, which checks every Standard
//! Webhooks signature with the specification's reference library) gets each event of each job, the
//! server's webhook and a job's own alike, across 30 s of being down and a kill -9 of the server; on
//! NATS, a subscriber gets them on the namespace's subjects too. Events are at least once: the receiver
//! may see one twice, always with the same id.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::service::{Server, SpecMut, request, tiny_model, wait_for};
use ddpm_worker::api::pb;
use tonic::Code;

const SUCCEEDED: i32 = pb::JobState::Succeeded as i32;
/// 32 random bytes, as Standard Webhooks secrets are written.
const SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD0wXlHbdF3Ek=";

/// The receiver process, and the file it appends what it gets to.
struct Receiver {
    child: Child,
    log: PathBuf,
}

impl Receiver {
    fn start(port: u16, secret: &Path, log: &Path) -> Receiver {
        let python = std::env::var("DDPM_PYTHON").expect("DDPM_PYTHON is not set: run `make test`");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/events/receiver.py");
        let mut child = Command::new(python)
            .arg(script)
            .args([&port.to_string(), secret.to_str().unwrap(), log.to_str().unwrap()])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "listening");
        Receiver { child, log: log.to_path_buf() }
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// What it got: each request as the receiver logged it.
    fn requests(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    /// The events it got at `path`, by id (a repeat is the same event), after checking every request:
    /// signature verified, the CloudEvents content type, the signed id the event's.
    fn events_at(&self, path: &str) -> BTreeMap<String, serde_json::Value> {
        let mut events = BTreeMap::new();
        for r in self.requests().into_iter().filter(|r| r["path"] == path) {
            assert_eq!(r["verified"], true, "{r}");
            assert_eq!(r["content_type"], "application/cloudevents+json", "{r}");
            let event = r["event"].clone();
            assert_eq!(r["webhook_id"], event["id"], "{r}");
            events.insert(event["id"].as_str().unwrap().to_string(), event);
        }
        events
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Polls until `done` holds, for at most `limit`.
async fn eventually(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `job`'s events among `events`, as (id, type, state) in order of their number.
fn timeline(events: &BTreeMap<String, serde_json::Value>, job: &str) -> Vec<(String, String, String)> {
    let mut mine: Vec<(u64, (String, String, String))> = events
        .values()
        .filter(|e| e["subject"] == job)
        .map(|e| {
            let id = e["id"].as_str().unwrap().to_string();
            let n = id.rsplit('.').next().unwrap().parse().unwrap();
            let kind = e["type"].as_str().unwrap().to_string();
            (n, (id, kind, e["data"]["state"].as_str().unwrap().to_string()))
        })
        .collect();
    mine.sort();
    mine.into_iter().map(|(_, t)| t).collect()
}

fn expected(job: &str, kinds: &[&str]) -> Vec<(String, String, String)> {
    kinds
        .iter()
        .enumerate()
        .map(|(i, k)| {
            (
                format!("{job}.{}", i + 1),
                format!("dev.ddpm.job.{k}"),
                format!("JOB_STATE_{}", k.to_uppercase()),
            )
        })
        .collect()
}

fn serve_args(dir: &Path, port: u16, secret: &Path, extra: &[String]) -> Vec<String> {
    let mut args = vec![
        "--model".to_string(),
        format!("tiny={}", tiny_model(dir).display()),
        "--output".into(),
        format!("file:{}", dir.join("jobs").display()),
        "--webhook".into(),
        format!("http://127.0.0.1:{port}/all"),
        "--allow-webhook".into(),
        format!("http://127.0.0.1:{port}/jobs/"),
        "--webhook-secret-file".into(),
        secret.display().to_string(),
        "--lease-seconds".into(),
        "2".into(),
    ];
    args.extend(extra.iter().cloned());
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_get_every_event_signed_across_an_outage_and_a_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("webhook-secret");
    std::fs::write(&secret, SECRET).unwrap();
    let [port] = common::process::free_ports::<1>().unwrap();
    let mut receiver = Receiver::start(port, &secret, &dir.path().join("received.jsonl"));
    let args = serve_args(dir.path(), port, &secret, &[]);
    let mut server = Server::start_with(dir.path(), &args, &[]).await;
    let mut client = server.client().await;

    // A job with its own webhook, submitted with the CLI: both webhooks get queued, running, succeeded.
    let own = format!("http://127.0.0.1:{port}/jobs/a");
    let out = Command::new(common::bin())
        .args(["submit", "--server", &server.url, "--model", "tiny", "--scheduler", "ddim", "--steps", "3"])
        .args(["--num-samples", "4", "--batch-size", "2", "--webhook-url", &own, "--output", "json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let submitted: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(submitted["spec"]["webhookUrl"], own.as_str());
    let a = common::service::get_job(&mut client, submitted["jobId"].as_str().unwrap()).await;
    wait_for(&mut client, &a.job_id, |j| j.state == SUCCEEDED).await;
    let done = expected(&a.job_id, &["queued", "running", "succeeded"]);
    eventually("the webhooks get job a's events", Duration::from_secs(30), || {
        timeline(&receiver.events_at("/all"), &a.job_id) == done
            && timeline(&receiver.events_at("/jobs/a"), &a.job_id) == done
    })
    .await;
    let all = receiver.events_at("/all");
    let data = &all[&format!("{}.3", a.job_id)]["data"];
    assert_eq!((data["samplesDone"].as_str(), data["samplesTotal"].as_str()), (Some("4"), Some("4")));
    assert!(data["manifestUri"].as_str().unwrap().ends_with("manifest.json"), "{data}");

    // A webhook outside the allowed prefixes is refused, naming the field.
    let mut outside = request(1, pb::Scheduler::Ddim, 1, 1);
    outside.s().webhook_url = format!("http://127.0.0.1:{port}/elsewhere");
    let refused = client.submit_job(outside).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert!(refused.message().contains("spec.webhook_url"), "{refused:?}");

    // The receiver goes down for 30 s. Meanwhile job b runs, the server is killed (-9) and restarted,
    // and job a is deleted: every event waits in the outbox and arrives once the receiver is back.
    receiver.stop();
    let down = Instant::now();
    let b = client.submit_job(request(4, pb::Scheduler::Ddim, 3, 2)).await.unwrap().into_inner().job.unwrap();
    wait_for(&mut client, &b.job_id, |j| j.state == SUCCEEDED).await;
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    drop(server);
    let server = Server::start_with(dir.path(), &args, &[]).await;
    let mut client = server.client().await;
    client.delete_job(pb::DeleteJobRequest { job_id: a.job_id.clone() }).await.unwrap();
    tokio::time::sleep(Duration::from_secs(30).saturating_sub(down.elapsed())).await;
    let receiver = Receiver::start(port, &secret, &dir.path().join("received.jsonl"));
    let a_all = expected(&a.job_id, &["queued", "running", "succeeded", "deleted"]);
    let b_all = expected(&b.job_id, &["queued", "running", "succeeded"]);
    eventually("the webhooks get what they missed", Duration::from_secs(120), || {
        let all = receiver.events_at("/all");
        timeline(&all, &a.job_id) == a_all
            && timeline(&all, &b.job_id) == b_all
            && timeline(&receiver.events_at("/jobs/a"), &a.job_id) == a_all
    })
    .await;
    // Nothing else: every event is one of these (a repeat has an id already seen).
    let ids: BTreeSet<String> = receiver.events_at("/all").into_keys().collect();
    let wanted: BTreeSet<String> = a_all.iter().chain(&b_all).map(|(id, _, _)| id.clone()).collect();
    assert_eq!(ids, wanted);
    assert!(receiver.events_at("/jobs/a").keys().all(|id| id.starts_with(&a.job_id)), "only job a's own");
    assert!(receiver.requests().iter().all(|r| r["verified"] == true));
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_nats_events_are_on_the_namespace_subjects_and_reach_the_webhook() {
    use common::nats::{NatsServer, unique_namespace};
    use tokio_stream::StreamExt;
    let nats = NatsServer::shared().await;
    let namespace = unique_namespace("events");
    let subscriber = async_nats::connect(nats.url()).await.unwrap();
    let mut subscription = subscriber.subscribe(format!("ddpm.{namespace}.events.>")).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("webhook-secret");
    std::fs::write(&secret, SECRET).unwrap();
    let [port] = common::process::free_ports::<1>().unwrap();
    let receiver = Receiver::start(port, &secret, &dir.path().join("received.jsonl"));
    let queue = ["--queue".to_string(), format!("{}/{namespace}", nats.url())];
    let server = Server::start_with(dir.path(), &serve_args(dir.path(), port, &secret, &queue), &[]).await;
    let mut client = server.client().await;
    let job =
        client.submit_job(request(4, pb::Scheduler::Ddim, 3, 2)).await.unwrap().into_inner().job.unwrap();
    wait_for(&mut client, &job.job_id, |j| j.state == SUCCEEDED).await;

    let done = expected(&job.job_id, &["queued", "running", "succeeded"]);
    let mut published = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while timeline(&published, &job.job_id) != done {
        let left = deadline.saturating_duration_since(Instant::now());
        let message =
            tokio::time::timeout(left, subscription.next()).await.expect("the events in time").unwrap();
        let event: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
        let id = event["id"].as_str().unwrap().to_string();
        let kind = event["type"].as_str().unwrap().trim_start_matches("dev.ddpm.job.").to_string();
        assert_eq!(message.subject.as_str(), format!("ddpm.{namespace}.events.job.{kind}"));
        let msg_id =
            message.headers.as_ref().and_then(|h| h.get("Nats-Msg-Id")).map(|v| v.as_str().to_string());
        assert_eq!(msg_id.as_deref(), Some(id.as_str()));
        assert_eq!(event["source"], format!("/ddpm-worker/{namespace}"));
        published.insert(id, event);
    }
    eventually("the webhook gets the job's events", Duration::from_secs(30), || {
        timeline(&receiver.events_at("/all"), &job.job_id) == done
    })
    .await;
    assert_eq!(receiver.events_at("/all"), published, "the webhook gets what the subject carries");
}
