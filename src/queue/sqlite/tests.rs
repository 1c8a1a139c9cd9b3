//! The SQLite store's own behaviour (times passed in, no sleeping) and the shared conformance suite.

use super::*;
use crate::job::JobState;
use crate::queue::{EnqueueOutcome, TaskSpec, TaskState};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_passes_the_conformance_suite() {
    crate::queue::conformance::run_all(|| async { SqliteQueue::new(SqliteStore::in_memory().unwrap()) })
        .await;
}

fn task(job: &str, shard: u64, priority: i32) -> TaskSpec {
    TaskSpec {
        job_id: job.into(),
        shard,
        priority,
        payload: format!("{{\"shard\":{shard}}}"),
        max_attempts: 2,
    }
}

#[test]
fn enqueue_is_idempotent_per_shard() {
    let q = SqliteStore::in_memory().unwrap();
    assert_eq!(q.enqueue(&task("j", 0, 0), 0).unwrap(), EnqueueOutcome::Created);
    assert_eq!(q.enqueue(&task("j", 0, 0), 1).unwrap(), EnqueueOutcome::Duplicate);
    assert_eq!(q.enqueue(&task("j", 1, 0), 1).unwrap(), EnqueueOutcome::Created);
}

#[test]
fn leases_go_by_priority_then_age_and_only_once() {
    let q = SqliteStore::in_memory().unwrap();
    q.enqueue(&task("a", 0, 0), 0).unwrap();
    q.enqueue(&task("b", 0, 5), 1).unwrap();
    q.enqueue(&task("a", 1, 0), 2).unwrap();
    let first = q.lease("w1", 10, 1000).unwrap().unwrap();
    assert_eq!((first.job_id.as_str(), first.shard, first.attempt), ("b", 0, 1));
    let second = q.lease("w2", 10, 1000).unwrap().unwrap();
    assert_eq!((second.job_id.as_str(), second.shard), ("a", 0));
    let third = q.lease("w1", 10, 1000).unwrap().unwrap();
    assert_eq!((third.job_id.as_str(), third.shard), ("a", 1));
    assert!(q.lease("w3", 10, 1000).unwrap().is_none());
}

#[test]
fn an_expired_lease_is_fenced_after_takeover() {
    let q = SqliteStore::in_memory().unwrap();
    q.enqueue(&task("j", 0, 0), 0).unwrap();
    let mut zombie = q.lease("w1", 0, 100).unwrap().unwrap();
    q.heartbeat(&mut zombie, 50, 100).unwrap();
    assert_eq!(zombie.expires_at, 150);
    // w1 stalls past its lease; the reaper requeues and w2 takes the task over.
    assert_eq!(q.reap(200).unwrap(), ReapReport { requeued: 1, dead: 0 });
    let fresh = q.lease("w2", 200, 100).unwrap().unwrap();
    assert_eq!(fresh.attempt, 2);
    // Every write of the zombie changes nothing.
    assert!(matches!(q.heartbeat(&mut zombie, 210, 100), Err(QueueError::LeaseLost { .. })));
    assert!(matches!(q.complete(&zombie), Err(QueueError::LeaseLost { .. })));
    assert!(matches!(q.dead_letter(&zombie, "x"), Err(QueueError::LeaseLost { .. })));
    assert_eq!(q.task_state("j", 0).unwrap().unwrap().0, TaskState::Leased);
    q.complete(&fresh).unwrap();
    assert_eq!(q.task_state("j", 0).unwrap().unwrap().0, TaskState::Done);
    assert!(matches!(q.complete(&fresh), Err(QueueError::LeaseLost { .. })));
}

#[test]
fn attempts_run_out_into_the_dead_letters() {
    let q = SqliteStore::in_memory().unwrap();
    q.enqueue(&task("j", 0, 0), 0).unwrap();
    let l1 = q.lease("w", 0, 100).unwrap().unwrap();
    q.retry_later(&l1, 10, 50, "cuda error").unwrap();
    assert!(q.lease("w", 20, 100).unwrap().is_none(), "not available before its delay");
    let l2 = q.lease("w", 60, 100).unwrap().unwrap();
    assert_eq!(l2.attempt, 2);
    // The second (last) attempt expires: the reaper dead-letters instead of requeueing.
    assert_eq!(q.reap(1000).unwrap(), ReapReport { requeued: 0, dead: 1 });
    let (state, attempts, error) = q.task_state("j", 0).unwrap().unwrap();
    assert_eq!((state, attempts), (TaskState::Dead, 2));
    assert_eq!(error.as_deref(), Some("lease expired after the last attempt"));
    assert!(q.lease("w", 2000, 100).unwrap().is_none());
}

#[test]
fn the_queue_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("queue.sqlite");
    {
        let q = SqliteStore::open(&path).unwrap();
        q.enqueue(&task("j", 0, 0), 0).unwrap();
        q.enqueue(&task("j", 1, 0), 0).unwrap();
        let l = q.lease("w", 0, 100).unwrap().unwrap();
        q.complete(&l).unwrap();
        // The process dies holding a lease on shard 1.
        q.lease("w", 0, 100).unwrap().unwrap();
    }
    let q = SqliteStore::open(&path).unwrap();
    assert_eq!(q.task_state("j", 0).unwrap().unwrap().0, TaskState::Done);
    assert_eq!(q.reap(500).unwrap().requeued, 1);
    let l = q.lease("w2", 500, 100).unwrap().unwrap();
    assert_eq!((l.shard, l.attempt), (1, 2));
}

fn key(id: &str, hash: &str) -> IdempotencyKey {
    IdempotencyKey { request_id: id.into(), request_hash: hash.into() }
}

fn spec(num_samples: u64, batch: u32) -> crate::job::JobSpec {
    crate::job::JobSpec {
        request_id: String::new(),
        owner: String::new(),
        model: "cifar10".into(),
        scheduler: crate::schedulers::SchedulerKind::Ddim,
        steps: 50,
        eta: None,
        num_samples,
        seed: 42,
        batch_size: batch,
        samples_per_grid: 64,
        grid_columns: 8,
        output: None,
        priority: 0,
        labels: [("dataset".to_string(), "v1".to_string())].into(),
        dataset: Default::default(),
        trace_context: Default::default(),
        extends: None,
        webhook: None,
        classes: None,
    }
}

#[test]
fn submit_records_the_job_and_its_shards_atomically() {
    let q = SqliteStore::in_memory().unwrap();
    let out = q.submit(&spec(10, 2), Some(&key("req-1", "h1")), 2, 3, 100).unwrap();
    assert!(out.created);
    let job = out.job;
    assert_eq!(
        (job.state, job.shards_total, job.shards_done, job.created_at_ms),
        (JobState::Queued, 3, 0, 100)
    );
    // Shards of 2 batches x 2 samples: [0, 4), [4, 8), [8, 10).
    let mut ranges = Vec::new();
    while let Some(l) = q.lease("w", 100, 1000).unwrap() {
        let p: crate::job::ShardPayload = serde_json::from_str(&l.payload).unwrap();
        ranges.push((l.shard, p.start, p.end));
    }
    ranges.sort();
    assert_eq!(ranges, vec![(0, 0, 4), (1, 4, 8), (2, 8, 10)]);
}

#[test]
fn resubmitting_a_request_id_returns_the_job_or_refuses_a_different_request() {
    let q = SqliteStore::in_memory().unwrap();
    let first = q.submit(&spec(10, 2), Some(&key("req-1", "h1")), 1, 3, 0).unwrap();
    // A retry: the boundary may resolve defaults differently, the request hash is what counts.
    let again = q.submit(&spec(12, 2), Some(&key("req-1", "h1")), 1, 3, 5).unwrap();
    assert!(!again.created);
    assert_eq!(again.job.id, first.job.id);
    assert_eq!(again.job.spec.num_samples, 10);
    let err = q.submit(&spec(10, 2), Some(&key("req-1", "h2")), 1, 3, 5).unwrap_err();
    assert!(matches!(err, QueueError::IdempotencyConflict { .. }), "{err}");
    // Without a key every submission is a new job.
    assert_ne!(q.submit(&spec(10, 2), None, 1, 3, 0).unwrap().job.id, first.job.id);
}

#[test]
fn shard_completions_count_once_and_only_under_a_held_lease() {
    let q = SqliteStore::in_memory().unwrap();
    let id = q.submit(&spec(4, 2), None, 1, 3, 0).unwrap().job.id;
    let zombie = q.lease("w1", 0, 10).unwrap().unwrap();
    q.reap(20).unwrap();
    // The requeued shard goes behind the one that has waited since the start.
    let other = q.lease("w2", 20, 10).unwrap().unwrap();
    let fresh = q.lease("w2", 20, 10).unwrap().unwrap();
    assert_eq!((fresh.shard, fresh.attempt), (zombie.shard, 2));
    assert_ne!(other.shard, zombie.shard);
    assert!(matches!(q.complete_shard(&zombie, 2, 25), Err(QueueError::LeaseLost { .. })));
    let job = q.complete_shard(&fresh, 2, 25).unwrap();
    assert_eq!(
        (job.state, job.samples_done, job.shards_done, job.started_at_ms),
        (JobState::Running, 2, 1, Some(0))
    );
    let job = q.complete_shard(&other, 2, 29).unwrap();
    assert_eq!((job.samples_done, job.shards_done, job.shards_total), (4, 2, 2));
    let done =
        q.finish_job(&id, JobState::Succeeded, None, Some("file:///out/manifest.json"), 40).unwrap().unwrap();
    assert_eq!((done.state, done.finished_at_ms), (JobState::Succeeded, Some(40)));
    // A terminal state is final.
    let again = q.finish_job(&id, JobState::Cancelled, None, None, 50).unwrap().unwrap();
    assert_eq!(again.state, JobState::Succeeded);
}

#[test]
fn cancelling_retires_unfinished_shards_and_dead_shards_fail_jobs() {
    let q = SqliteStore::in_memory().unwrap();
    let a = q.submit(&spec(6, 2), None, 1, 1, 0).unwrap().job.id;
    let running = q.lease("w", 0, 100).unwrap().unwrap();
    let job = q.finish_job(&a, JobState::Cancelled, None, None, 5).unwrap().unwrap();
    assert_eq!(job.state, JobState::Cancelled);
    assert!(q.lease("w", 10, 100).unwrap().is_none(), "no shard of a cancelled job is handed out");
    assert!(matches!(q.complete_shard(&running, 2, 10), Err(QueueError::LeaseLost { .. })));

    let b = q.submit(&spec(2, 2), None, 1, 1, 0).unwrap().job.id;
    let l = q.lease("w", 20, 100).unwrap().unwrap();
    q.retry_later(&l, 30, 0, "out of memory").unwrap();
    assert_eq!(q.jobs_with_dead_shards().unwrap(), vec![(b.clone(), "out of memory".to_string())]);
    q.finish_job(&b, JobState::Failed, Some("shard 0: out of memory"), None, 40).unwrap();
    assert!(q.jobs_with_dead_shards().unwrap().is_empty());
    assert_eq!(q.job(&b).unwrap().unwrap().error.as_deref(), Some("shard 0: out of memory"));
}

/// A queue file of the release before deletion, events and shard stats: opened by this one, it gains
/// their columns and tables in place, and its jobs can be read, counted, deleted and cleaned up.
#[test]
fn a_queue_file_of_the_previous_release_gains_the_new_columns_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("queue.sqlite");
    {
        let old = rusqlite::Connection::open(&path).unwrap();
        old.execute_batch(
            "CREATE TABLE tasks (
                id INTEGER PRIMARY KEY, job_id TEXT NOT NULL, shard INTEGER NOT NULL, priority INTEGER NOT NULL,
                payload TEXT NOT NULL,
                state TEXT NOT NULL CHECK (state IN ('queued', 'leased', 'done', 'dead')),
                available_at INTEGER NOT NULL, lease_owner TEXT, lease_expires_at INTEGER,
                attempts INTEGER NOT NULL DEFAULT 0, max_attempts INTEGER NOT NULL, last_error TEXT,
                UNIQUE (job_id, shard));
             CREATE TABLE jobs (
                id TEXT PRIMARY KEY, spec TEXT NOT NULL, state TEXT NOT NULL, priority INTEGER NOT NULL,
                samples_done INTEGER NOT NULL DEFAULT 0, shards_done INTEGER NOT NULL DEFAULT 0,
                shards_total INTEGER NOT NULL, created_at INTEGER NOT NULL, started_at INTEGER,
                finished_at INTEGER, updated_at INTEGER NOT NULL, error TEXT, manifest_uri TEXT);
             CREATE TABLE idempotency (key TEXT PRIMARY KEY, job_id TEXT NOT NULL, request_hash TEXT NOT NULL);",
        )
        .unwrap();
        let spec = serde_json::to_string(&spec(4, 2)).unwrap();
        old.execute(
            "INSERT INTO jobs (id, spec, state, priority, samples_done, shards_done, shards_total, created_at,
                               started_at, finished_at, updated_at)
             VALUES ('old', ?1, 'cancelled', 0, 2, 1, 2, 10, 11, 12, 12)",
            [&spec],
        )
        .unwrap();
        old.execute(
            "INSERT INTO tasks (job_id, shard, priority, payload, state, available_at, attempts, max_attempts)
             VALUES ('old', 0, 0, '{\"start\":0,\"end\":2}', 'done', 0, 1, 3),
                    ('old', 1, 0, '{\"start\":2,\"end\":4}', 'dead', 0, 0, 3)",
            [],
        )
        .unwrap();
    }
    let q = SqliteStore::open(&path).unwrap();
    let job = q.job("old").unwrap().unwrap();
    assert_eq!((job.state, job.samples_done), (JobState::Cancelled, 2));
    let stats = q.shard_stats("old").unwrap().unwrap();
    assert_eq!(
        (stats.attempts, stats.retried, stats.failed),
        (1, 0, 1),
        "a dead task of before counts as failed"
    );
    // Its partial outputs are due for cleanup, then it is deleted and its record goes.
    let due = q.jobs_to_purge(100, 10).unwrap();
    assert_eq!((due.len(), due[0].outputs, due[0].record), (1, true, false));
    q.purged(&due[0]).unwrap();
    assert_eq!(q.delete_job("old", false, 200).unwrap().unwrap().state, JobState::Cancelled);
    assert!(q.job("old").unwrap().is_none());
    let events = q.pending_events(10, 1000, 300).unwrap();
    assert_eq!(events.iter().map(|e| e.event.id.as_str()).collect::<Vec<_>>(), ["old.1"], "its deletion");
    let due = q.jobs_to_purge(300, 10).unwrap();
    q.purged(&due[0]).unwrap();
    assert!(q.jobs_to_purge(i64::MAX, 10).unwrap().is_empty());
}
