//! The NATS JetStream queue backend against a real `nats-server`: the conformance suite the SQLite
//! store passes, each check in its own namespace, plus the backend's own checks.

mod common;

use std::time::Duration;

use common::nats::{NatsServer, unique_namespace};
use ddpm_worker::queue::conformance::{self, spec};
use ddpm_worker::queue::nats::{NatsOptions, NatsQueue};
use ddpm_worker::queue::{JobStore, QueueError, TaskQueue, TaskState};

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
