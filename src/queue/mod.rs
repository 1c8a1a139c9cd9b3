//! Durable jobs and queue of shard tasks. The embedded default is one SQLite file ([`sqlite::SqliteStore`]);
//! the gRPC service drives it from an actor. [`nats::NatsQueue`] is a distributed backend on NATS
//! JetStream behind the same operations (enqueue with dedup, lease, heartbeat, complete, retry later,
//! dead-letter, reap); both pass the `conformance` suite (built for tests and the `test-support` feature).

#[cfg(any(test, feature = "test-support"))]
pub mod conformance;
pub mod nats;
pub mod sqlite;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::job::{JobRecord, JobSpec, JobState};
pub use sqlite::{JobFilter, PageCursor};

/// Milliseconds since the Unix epoch: the queue's clock.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

fn ms(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

/// Shard tasks with leases: what a device worker pulls from. Every write made under a lease is fenced
/// by it; a lease that expired and was taken over gets [`QueueError::LeaseLost`].
#[async_trait]
pub trait TaskQueue: Send + Sync + 'static {
    /// Claims the next task (highest priority, then oldest) for `owner` for `ttl`.
    async fn lease(&self, owner: &str, ttl: Duration) -> Result<Option<Lease>, QueueError>;
    /// Extends a held lease by `ttl` from now.
    async fn heartbeat(&self, lease: &mut Lease, ttl: Duration) -> Result<(), QueueError>;
    /// Gives the task back without spending an attempt, to run again after `delay`: a draining worker
    /// (no delay), or one whose store or queue was out of reach (an outage is not the shard's fault).
    async fn release(&self, lease: &Lease, delay: Duration, reason: &str) -> Result<(), QueueError>;
    /// Gives the task back after a failure, to run again after `delay`, or dead-letters it when its
    /// attempts are used up.
    async fn retry_later(&self, lease: &Lease, delay: Duration, error: &str) -> Result<(), QueueError>;
    async fn dead_letter(&self, lease: &Lease, error: &str) -> Result<(), QueueError>;
    /// Requeues expired leases; dead-letters the tasks among them that used their attempts.
    async fn reap(&self) -> Result<ReapReport, QueueError>;
    /// Tasks queued or leased.
    async fn depth(&self) -> Result<u64, QueueError>;
}

/// Jobs, their progress and idempotency keys.
#[async_trait]
pub trait JobStore: Send + Sync + 'static {
    /// Records a job and queues its shards atomically (see [`sqlite::SqliteStore::submit`]).
    async fn submit(
        &self,
        spec: &JobSpec,
        idempotency: Option<&IdempotencyKey>,
        batches_per_shard: u64,
        max_attempts: u32,
    ) -> Result<SubmitOutcome, QueueError>;
    async fn job(&self, id: &str) -> Result<Option<JobRecord>, QueueError>;
    async fn list_jobs(
        &self,
        filter: &JobFilter,
        cursor: Option<&PageCursor>,
        limit: usize,
    ) -> Result<Vec<JobRecord>, QueueError>;
    /// Completes a shard task under its lease and counts its samples, once.
    async fn complete_shard(&self, lease: &Lease, samples: u64) -> Result<JobRecord, QueueError>;
    /// Moves a job to a terminal state (first one wins) and retires its unfinished shards.
    async fn finish_job(
        &self,
        id: &str,
        state: JobState,
        error: Option<&str>,
        manifest_uri: Option<&str>,
    ) -> Result<Option<JobRecord>, QueueError>;
    /// Runs a FAILED job again: its dead shards are queued with fresh attempts, its finished shards
    /// stay finished. `None` when there is no such job; a job in another state is returned unchanged.
    async fn retry_job(&self, id: &str) -> Result<Option<JobRecord>, QueueError>;
    /// Unfinished jobs with a dead-lettered shard, with that shard's error.
    async fn jobs_with_dead_shards(&self) -> Result<Vec<(String, String)>, QueueError>;
    /// Running jobs with every shard done that nobody finalized within `stale`.
    async fn jobs_to_finalize(&self, stale: Duration) -> Result<Vec<String>, QueueError>;
    /// How many jobs are in each state.
    async fn job_counts(&self) -> Result<Vec<(JobState, u64)>, QueueError>;
}

/// Both halves, as the service uses them.
pub trait Queue: TaskQueue + JobStore {}
impl<T: TaskQueue + JobStore> Queue for T {}

/// The SQLite store behind the async traits: each call runs on tokio's blocking pool.
#[derive(Clone)]
pub struct SqliteQueue(Arc<sqlite::SqliteStore>);

impl SqliteQueue {
    pub fn new(store: sqlite::SqliteStore) -> Self {
        Self(Arc::new(store))
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&sqlite::SqliteStore) -> Result<T, QueueError> + Send + 'static,
    ) -> Result<T, QueueError> {
        let store = Arc::clone(&self.0);
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| QueueError::Corrupt(format!("queue call panicked: {e}")))?
    }
}

#[async_trait]
impl TaskQueue for SqliteQueue {
    async fn lease(&self, owner: &str, ttl: Duration) -> Result<Option<Lease>, QueueError> {
        let owner = owner.to_string();
        self.run(move |s| s.lease(&owner, now_ms(), ms(ttl))).await
    }

    async fn heartbeat(&self, lease: &mut Lease, ttl: Duration) -> Result<(), QueueError> {
        let mut held = lease.clone();
        let held = self
            .run(move |s| {
                s.heartbeat(&mut held, now_ms(), ms(ttl))?;
                Ok(held)
            })
            .await?;
        *lease = held;
        Ok(())
    }

    async fn release(&self, lease: &Lease, delay: Duration, reason: &str) -> Result<(), QueueError> {
        let (lease, reason) = (lease.clone(), reason.to_string());
        self.run(move |s| s.release(&lease, now_ms(), ms(delay), &reason)).await
    }

    async fn retry_later(&self, lease: &Lease, delay: Duration, error: &str) -> Result<(), QueueError> {
        let (lease, error) = (lease.clone(), error.to_string());
        self.run(move |s| s.retry_later(&lease, now_ms(), ms(delay), &error)).await
    }

    async fn dead_letter(&self, lease: &Lease, error: &str) -> Result<(), QueueError> {
        let (lease, error) = (lease.clone(), error.to_string());
        self.run(move |s| s.dead_letter(&lease, &error)).await
    }

    async fn reap(&self) -> Result<ReapReport, QueueError> {
        self.run(|s| s.reap(now_ms())).await
    }

    async fn depth(&self) -> Result<u64, QueueError> {
        self.run(|s| s.queue_depth()).await
    }
}

#[async_trait]
impl JobStore for SqliteQueue {
    async fn submit(
        &self,
        spec: &JobSpec,
        idempotency: Option<&IdempotencyKey>,
        batches_per_shard: u64,
        max_attempts: u32,
    ) -> Result<SubmitOutcome, QueueError> {
        let (spec, key) = (spec.clone(), idempotency.cloned());
        self.run(move |s| s.submit(&spec, key.as_ref(), batches_per_shard, max_attempts, now_ms())).await
    }

    async fn job(&self, id: &str) -> Result<Option<JobRecord>, QueueError> {
        let id = id.to_string();
        self.run(move |s| s.job(&id)).await
    }

    async fn list_jobs(
        &self,
        filter: &JobFilter,
        cursor: Option<&PageCursor>,
        limit: usize,
    ) -> Result<Vec<JobRecord>, QueueError> {
        let (filter, cursor) = (filter.clone(), cursor.cloned());
        self.run(move |s| s.list_jobs(&filter, cursor.as_ref(), limit)).await
    }

    async fn complete_shard(&self, lease: &Lease, samples: u64) -> Result<JobRecord, QueueError> {
        let lease = lease.clone();
        self.run(move |s| s.complete_shard(&lease, samples, now_ms())).await
    }

    async fn finish_job(
        &self,
        id: &str,
        state: JobState,
        error: Option<&str>,
        manifest_uri: Option<&str>,
    ) -> Result<Option<JobRecord>, QueueError> {
        let (id, error, uri) = (id.to_string(), error.map(str::to_string), manifest_uri.map(str::to_string));
        self.run(move |s| s.finish_job(&id, state, error.as_deref(), uri.as_deref(), now_ms())).await
    }

    async fn retry_job(&self, id: &str) -> Result<Option<JobRecord>, QueueError> {
        let id = id.to_string();
        self.run(move |s| s.retry_job(&id, now_ms())).await
    }

    async fn jobs_with_dead_shards(&self) -> Result<Vec<(String, String)>, QueueError> {
        self.run(|s| s.jobs_with_dead_shards()).await
    }

    async fn jobs_to_finalize(&self, stale: Duration) -> Result<Vec<String>, QueueError> {
        self.run(move |s| s.jobs_to_finalize(now_ms(), ms(stale))).await
    }

    async fn job_counts(&self) -> Result<Vec<(JobState, u64)>, QueueError> {
        self.run(|s| s.job_counts()).await
    }
}

/// A shard of a job to run: `payload` is the shard's JSON spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskSpec {
    pub job_id: String,
    pub shard: u64,
    /// Higher runs first.
    pub priority: i32,
    pub payload: String,
    pub max_attempts: u32,
}

/// A task claimed by a worker until `expires_at` (ms). `attempt` fences every write made under it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub task_id: i64,
    pub job_id: String,
    pub shard: u64,
    pub payload: String,
    pub owner: String,
    pub attempt: u32,
    pub expires_at: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnqueueOutcome {
    Created,
    Duplicate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskState {
    Queued,
    Leased,
    Done,
    Dead,
}

impl FromStr for TaskState {
    type Err = QueueError;

    fn from_str(s: &str) -> Result<Self, QueueError> {
        match s {
            "queued" => Ok(TaskState::Queued),
            "leased" => Ok(TaskState::Leased),
            "done" => Ok(TaskState::Done),
            "dead" => Ok(TaskState::Dead),
            other => Err(QueueError::Corrupt(format!("unknown task state {other:?}"))),
        }
    }
}

/// A client's idempotency key and a hash of the request as the client sent it (before defaults such as
/// the seed are filled in, so a retry of a seedless request is recognised as the same request).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey {
    pub request_id: String,
    pub request_hash: String,
}

/// The job a submission refers to, and whether this submission created it.
#[derive(Debug, Clone, PartialEq)]
pub struct SubmitOutcome {
    pub job: JobRecord,
    pub created: bool,
}

/// What one reaper pass did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReapReport {
    pub requeued: usize,
    pub dead: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The lease expired and the task was taken over (or finished): the caller must stop working on it.
    #[error("lease on task {task_id} is no longer held")]
    LeaseLost { task_id: i64 },
    /// The idempotency key was used before for a different request.
    #[error("request_id {request_id:?} was already used for a different request (job {job_id})")]
    IdempotencyConflict { request_id: String, job_id: String },
    #[error("queue store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("queue store is corrupt: {0}")]
    Corrupt(String),
    /// The NATS server could not be reached or refused a request (the service maps it to UNAVAILABLE).
    #[error("queue server: {0}")]
    Nats(String),
}

#[cfg(test)]
mod tests {
    use super::sqlite::SqliteStore;
    use super::*;
    use crate::job::JobState;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_passes_the_conformance_suite() {
        super::conformance::run_all(|| async { SqliteQueue::new(SqliteStore::in_memory().unwrap()) }).await;
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
        let done = q
            .finish_job(&id, JobState::Succeeded, None, Some("file:///out/manifest.json"), 40)
            .unwrap()
            .unwrap();
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
}
