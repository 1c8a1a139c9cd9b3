//! The NATS JetStream queue backend against a real `nats-server`: the conformance suite the SQLite
//! store passes, each check in its own namespace, plus the backend's own checks.

mod common;

use std::time::Duration;

use common::nats::{NatsServer, unique_namespace};
use ddpm_worker::queue::conformance::{self, spec};
use ddpm_worker::queue::nats::{NatsOptions, NatsQueue};
use ddpm_worker::queue::{IdempotencyKey, JobStore, QueueError, TaskQueue, TaskState};

async fn queue(server: &NatsServer, name: &str, options: NatsOptions) -> NatsQueue {
    NatsQueue::connect(&server.url(), &unique_namespace(name), options)
        .await
        .unwrap_or_else(|e| panic!("opening a NATS queue: {e}\n{}", server.log_tail()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_passes_the_conformance_suite() {
    let server = NatsServer::shared().await;
    conformance::run_all(|| queue(&server, "conformance", NatsOptions::default())).await;
}

/// A worker that stops heartbeating is taken over after AckWait even if no reaper runs: the
/// redelivered message finds the expired lease and leases it again, spending an attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_lease_comes_back_through_redelivery() {
    let server = NatsServer::shared().await;
    let options = NatsOptions { ack_wait: Duration::from_millis(300), ..Default::default() };
    let q = queue(&server, "redelivery", options).await;
    let id = q.submit(&spec(2, 2, 0, &[]), None, 1, 3).await.unwrap().job.id;
    let zombie = q.lease("w1", Duration::from_millis(100)).await.unwrap().unwrap();
    assert!(q.lease("w2", Duration::from_secs(60)).await.unwrap().is_none());
    tokio::time::sleep(Duration::from_millis(600)).await;
    let fresh = q.lease("w2", Duration::from_secs(60)).await.unwrap().expect("redelivered after AckWait");
    assert_eq!((fresh.shard, fresh.attempt), (zombie.shard, 2));
    assert!(matches!(q.complete_shard(&zombie, 2).await, Err(QueueError::LeaseLost { .. })));
    q.complete_shard(&fresh, 2).await.unwrap();
    assert_eq!(q.task_state(&id, 0).await.unwrap().unwrap().0, TaskState::Done);
    assert_eq!(q.depth().await.unwrap(), 0);
    q.destroy().await.unwrap();
}

/// A lease held past AckWait by heartbeats is not handed to anyone else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_keep_a_lease_past_ack_wait() {
    let server = NatsServer::shared().await;
    let options = NatsOptions { ack_wait: Duration::from_millis(300), ..Default::default() };
    let q = queue(&server, "heartbeat", options).await;
    q.submit(&spec(2, 2, 0, &[]), None, 1, 3).await.unwrap();
    let mut held = q.lease("w1", Duration::from_millis(400)).await.unwrap().unwrap();
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        q.heartbeat(&mut held, Duration::from_millis(400)).await.unwrap();
        assert!(q.lease("w2", Duration::from_secs(60)).await.unwrap().is_none());
    }
    q.complete_shard(&held, 2).await.unwrap();
    q.destroy().await.unwrap();
}

/// A submitter that claimed an idempotency key and died before writing its job: a retry of the
/// request waits `submit_wait`, then writes the job under the claimed id and queues its shards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submission_whose_submitter_died_is_rolled_forward() {
    use sha2::Digest;

    let server = NatsServer::shared().await;
    let namespace = unique_namespace("rollforward");
    let options = NatsOptions { submit_wait: Duration::from_millis(200), ..Default::default() };
    let q = NatsQueue::connect(&server.url(), &namespace, options).await.unwrap();
    let client = async_nats::connect(server.url()).await.unwrap();
    let idem =
        async_nats::jetstream::new(client).get_key_value(format!("ddpm_{namespace}_idem")).await.unwrap();
    let claimed = r#"{"request_id":"req","request_hash":"h","job_id":"orphaned-job"}"#;
    idem.create(hex::encode(sha2::Sha256::digest(b"req")), claimed.into()).await.unwrap();

    let key = IdempotencyKey { request_id: "req".into(), request_hash: "h".into() };
    let out = q.submit(&spec(4, 2, 0, &[]), Some(&key), 1, 3).await.unwrap();
    assert_eq!((out.created, out.job.id.as_str(), out.job.shards_total), (false, "orphaned-job", 2));
    assert_eq!(q.depth().await.unwrap(), 2);
    let again = q.submit(&spec(4, 2, 0, &[]), Some(&key), 1, 3).await.unwrap();
    assert_eq!(again.job.id, "orphaned-job");
    assert_eq!(q.depth().await.unwrap(), 2, "one set of shard tasks");
    let l = q.lease("w", Duration::from_secs(60)).await.unwrap().unwrap();
    assert_eq!((l.job_id.as_str(), l.attempt), ("orphaned-job", 1));
    q.destroy().await.unwrap();
}

/// The key-value buckets of a namespace, opened directly to play a crash between two writes.
async fn buckets(
    server: &NatsServer,
    namespace: &str,
) -> (async_nats::jetstream::kv::Store, async_nats::jetstream::kv::Store) {
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let jobs = js.get_key_value(format!("ddpm_{namespace}_jobs")).await.unwrap();
    let shards = js.get_key_value(format!("ddpm_{namespace}_shards")).await.unwrap();
    (jobs, shards)
}

/// A worker that dies between marking its shard done and counting it into the job: the reaper's
/// reconciler counts it, once, and a late count of the same shard adds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reconciler_counts_a_completion_the_job_missed_exactly_once() {
    let server = NatsServer::shared().await;
    let namespace = unique_namespace("reconcile-counts");
    let q = NatsQueue::connect(&server.url(), &namespace, NatsOptions::default()).await.unwrap();
    let id = q.submit(&spec(4, 2, 0, &[]), None, 1, 3).await.unwrap().job.id;
    let a = q.lease("w", Duration::from_secs(60)).await.unwrap().unwrap();
    let (jobs, _) = buckets(&server, &namespace).await;
    let before = jobs.get(&id).await.unwrap().unwrap();
    q.complete_shard(&a, 2).await.unwrap();
    // Roll the job record back to before the count: the shard is done, the job does not know.
    jobs.put(&id, before).await.unwrap();
    assert_eq!(q.job(&id).await.unwrap().unwrap().shards_done, 0);
    q.reap().await.unwrap();
    let job = q.job(&id).await.unwrap().unwrap();
    assert_eq!((job.shards_done, job.samples_done), (1, 2));
    q.reap().await.unwrap();
    assert_eq!(q.job(&id).await.unwrap().unwrap().shards_done, 1, "counted once");
    let b = q.lease("w", Duration::from_secs(60)).await.unwrap().unwrap();
    let job = q.complete_shard(&b, 2).await.unwrap();
    assert_eq!((job.shards_done, job.samples_done), (2, 4));
    q.destroy().await.unwrap();
}

/// A submitter that dies after writing the job but before all its shard tasks: once the job has been
/// quiet for twice the submit wait, the reconciler creates the missing tasks and they run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reconciler_recreates_shard_tasks_a_crashed_submit_left_out() {
    let server = NatsServer::shared().await;
    let namespace = unique_namespace("reconcile-tasks");
    let options = NatsOptions { submit_wait: Duration::from_millis(50), ..Default::default() };
    let q = NatsQueue::connect(&server.url(), &namespace, options).await.unwrap();
    let id = q.submit(&spec(4, 2, 0, &[]), None, 1, 3).await.unwrap().job.id;
    // Lose shard 1 entirely: its record, and (by running it to nothing) its message.
    let (_, shards) = buckets(&server, &namespace).await;
    shards.purge(format!("{id}.1")).await.unwrap();
    let mut leased = Vec::new();
    while let Some(l) = q.lease("w", Duration::from_secs(60)).await.unwrap() {
        leased.push(l.shard);
        q.complete_shard(&l, 2).await.unwrap();
    }
    assert_eq!(leased, [0], "shard 1's message found no record");
    tokio::time::sleep(Duration::from_millis(150)).await;
    q.reap().await.unwrap();
    let l = q.lease("w", Duration::from_secs(60)).await.unwrap().expect("the recreated task");
    assert_eq!((l.shard, l.attempt), (1, 1));
    let job = q.complete_shard(&l, 2).await.unwrap();
    assert_eq!((job.shards_done, job.samples_done, job.shards_total), (2, 4, 2));
    assert!(q.lease("w", Duration::from_secs(60)).await.unwrap().is_none());
    q.destroy().await.unwrap();
}
