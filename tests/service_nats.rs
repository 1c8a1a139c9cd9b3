//! The batch service on a shared NATS JetStream queue (a real nats-server started by the tests):
//! workers sharing jobs, large jobs, zombies and cancels across workers, and readiness.

mod common;

use std::time::Duration;

use common::service::{Server, SpecMut, job_samples, manifest, request, tiny_model, wait_for};
use ddpm_worker::api::pb;

const SUCCEEDED: i32 = pb::JobState::Succeeded as i32;
const CANCELLED: i32 = pb::JobState::Cancelled as i32;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_share_a_nats_queue() {
    use common::nats::{NatsServer, unique_namespace};
    let nats = NatsServer::shared().await;
    let queue = format!("{}/{}", nats.url(), unique_namespace("service"));
    let dir = tempfile::tempdir().unwrap();
    let model = format!("tiny={}", tiny_model(dir.path()).display());
    let output = format!("file:{}", dir.path().join("jobs").display());
    let args = |_: &str| {
        [
            "--model",
            &model,
            "--output",
            &output,
            "--queue",
            &queue,
            "--batches-per-shard",
            "1",
            "--cpu-threads",
            "1",
        ]
        .map(String::from)
    };
    // Each worker has its own data folder but they share the queue and the output directory.
    let a = Server::start_with(&dir.path().join("a"), &args("a"), &[]).await;
    let b = Server::start_with(&dir.path().join("b"), &args("b"), &[]).await;
    let mut client_a = a.client().await;
    let mut client_b = b.client().await;
    let job =
        client_a.submit_job(request(12, pb::Scheduler::Ddpm, 60, 2)).await.unwrap().into_inner().job.unwrap();
    // Either worker answers for the job; both take shards.
    let done = wait_for(&mut client_b, &job.job_id, |j| j.state == SUCCEEDED).await;
    assert_eq!((done.samples_done, done.shards_done), (12, 6));
    let samples = job_samples(&done).await;
    assert_eq!(samples.len(), 12);
    let m = manifest(&done);
    let mut workers: Vec<&str> =
        m["shards"].as_array().unwrap().iter().map(|s| s["worker"].as_str().unwrap()).collect();
    workers.sort();
    workers.dedup();
    assert_eq!(workers.len(), 2, "both workers sampled shards: {workers:?}");
    let listed = client_a.list_jobs(pb::ListJobsRequest::default()).await.unwrap().into_inner().jobs;
    assert_eq!(listed.iter().map(|j| j.job_id.as_str()).collect::<Vec<_>>(), [job.job_id.as_str()]);
}

/// `serve` flags for a worker on the NATS queue `queue` with the tiny model and outputs under `dir`.
fn nats_args(dir: &std::path::Path, queue: &str, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "--model".to_string(),
        format!("tiny={}", tiny_model(dir).display()),
        "--output".into(),
        format!("file:{}", dir.join("jobs").display()),
        "--queue".into(),
        queue.to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_twenty_thousand_shard_job_is_queued_in_bounded_batches_and_small_jobs_still_run() {
    use common::nats::{NatsServer, unique_namespace};
    let nats = NatsServer::shared().await;
    let queue = format!("{}/{}", nats.url(), unique_namespace("large"));
    let dir = tempfile::tempdir().unwrap();
    let flags = ["--max-shards-per-job", "20000", "--batches-per-shard", "1", "--grace-seconds", "1"];
    let mut server =
        Server::start_with(&dir.path().join("a"), &nats_args(dir.path(), &queue, &flags), &[]).await;
    let mut client = server.client().await;
    let big = tokio::time::timeout(
        Duration::from_secs(60),
        client.submit_job(request(20_000, pb::Scheduler::Ddim, 2, 1)),
    )
    .await
    .expect("SubmitJob of 20,000 shards answered")
    .unwrap()
    .into_inner()
    .job
    .unwrap();
    assert_eq!(big.shards_total, 20_000);
    // A small job of higher priority runs while the big one is being queued and sampled.
    let mut small = request(2, pb::Scheduler::Ddim, 3, 2);
    small.s().priority = 5;
    let small = client.submit_job(small).await.unwrap().into_inner().job.unwrap();
    let done = tokio::time::timeout(
        Duration::from_secs(120),
        wait_for(&mut client, &small.job_id, |j| j.state == SUCCEEDED),
    )
    .await
    .expect("the small job finished");
    assert_eq!(done.samples_done, 2);
    let cancelled = tokio::time::timeout(
        Duration::from_secs(120),
        client.cancel_job(pb::CancelJobRequest { job_id: big.job_id.clone() }),
    )
    .await
    .expect("CancelJob answered")
    .unwrap();
    assert_eq!(cancelled.into_inner().job.unwrap().state, CANCELLED);
    // The server still drains and exits on SIGTERM.
    common::service::signal(server.pid(), "TERM");
    let status = server.wait_exit(Duration::from_secs(45)).await;
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zombie_cannot_change_recorded_outputs_on_nats() {
    use common::nats::{NatsServer, unique_namespace};
    let nats = NatsServer::shared().await;
    let queue = format!("{}/{}", nats.url(), unique_namespace("zombie"));
    let dir = tempfile::tempdir().unwrap();
    common::service::a_zombie_cannot_change_recorded_outputs(dir.path(), &queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_on_one_worker_keeps_the_other_from_recording_shards() {
    use common::nats::{NatsServer, unique_namespace};
    let nats = NatsServer::shared().await;
    let queue = format!("{}/{}", nats.url(), unique_namespace("cancel"));
    let dir = tempfile::tempdir().unwrap();
    // Heartbeats every 15 s: the other worker learns of the cancel from its record fence, not from them.
    let flags = ["--batches-per-shard", "1", "--cpu-threads", "1"];
    let a = Server::start_with(&dir.path().join("a"), &nats_args(dir.path(), &queue, &flags), &[]).await;
    let b = Server::start_with(&dir.path().join("b"), &nats_args(dir.path(), &queue, &flags), &[]).await;
    let mut client = a.client().await;
    let job =
        client.submit_job(request(16, pb::Scheduler::Ddpm, 200, 2)).await.unwrap().into_inner().job.unwrap();
    wait_for(&mut client, &job.job_id, |j| j.shards_done >= 2).await;
    let cancelled = common::service::cancel_job(&mut client, &job.job_id).await;
    assert_eq!(cancelled.state, CANCELLED);
    // Long enough for both workers' running shards to finish sampling.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let records =
        std::fs::read_dir(dir.path().join("jobs").join(&job.job_id).join("shards")).unwrap().count();
    let after = common::service::get_job(&mut client, &job.job_id).await;
    assert_eq!(after.shards_done, cancelled.shards_done, "nothing counted after the cancel");
    assert_eq!(records as u32, cancelled.shards_done, "shard records written after the cancel");
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_queue() {
    use common::nats::{NatsServer, unique_namespace};
    use common::outage::Proxy;
    use tonic_health::pb::health_check_response::ServingStatus;
    let nats = NatsServer::shared().await;
    let mut proxy = Proxy::start(nats.url().trim_start_matches("nats://").parse().unwrap()).await;
    let queue = format!("nats://{}/{}", proxy.addr(), unique_namespace("ready"));
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(
        &dir.path().join("a"),
        &nats_args(dir.path(), &queue, &["--lease-seconds", "4"]),
        &[],
    )
    .await;
    let until = |want: ServingStatus, limit: Duration| {
        let server = &server;
        async move {
            let started = std::time::Instant::now();
            while started.elapsed() < limit {
                if server.health().await == Some(want as i32) {
                    return started.elapsed();
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            panic!("health did not become {want:?} within {limit:?}");
        }
    };
    until(ServingStatus::Serving, Duration::from_secs(5)).await;
    proxy.cut();
    until(ServingStatus::NotServing, Duration::from_secs(60)).await;
    // Liveness stays SERVING: a restart would not bring the queue back.
    let channel =
        tonic::transport::Endpoint::from_shared(server.url.clone()).unwrap().connect().await.unwrap();
    let live = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest { service: "liveness".into() })
        .await
        .unwrap();
    assert_eq!(live.into_inner().status, ServingStatus::Serving as i32);
    proxy.restore();
    until(ServingStatus::Serving, Duration::from_secs(90)).await;
    // And it works again.
    let mut client = server.client().await;
    let job =
        client.submit_job(request(2, pb::Scheduler::Ddim, 3, 2)).await.unwrap().into_inner().job.unwrap();
    wait_for(&mut client, &job.job_id, |j| j.state == SUCCEEDED).await;
}
