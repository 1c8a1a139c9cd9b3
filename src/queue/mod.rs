//! Durable jobs and queue of shard tasks, and how a job is cut into them ([`plan`]). The embedded
//! default is one SQLite file ([`sqlite::SqliteStore`]);
//! the gRPC service drives it from an actor. [`nats::NatsQueue`] is a distributed backend on NATS
//! JetStream behind the same operations (enqueue with dedup, lease, heartbeat, complete, retry later,
//! dead-letter, reap); both pass the `conformance` suite (built for tests and the `test-support` feature).

#[cfg(any(test, feature = "test-support"))]
pub mod conformance;
pub mod nats;
pub mod plan;
pub mod sqlite;

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;

use crate::job::{JobRecord, JobSpec, JobState};
pub use sqlite::SqliteQueue;

/// Milliseconds since the Unix epoch: the queue's clock.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

pub(crate) fn ms(d: Duration) -> i64 {
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
    /// Unfinished tasks of the whole queue (every worker sees the same counts), by state.
    async fn shard_counts(&self) -> Result<ShardCounts, QueueError>;
    /// Tasks queued or leased.
    async fn depth(&self) -> Result<u64, QueueError> {
        let counts = self.shard_counts().await?;
        Ok(counts.queued + counts.leased)
    }
}

/// Unfinished shard tasks: `queued` wait for a worker (retries waiting out their delay included),
/// `leased` are being run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ShardCounts {
    pub queued: u64,
    pub leased: u64,
    /// When the longest-waiting queued shard became available (a retry's: when its delay ends); `None`
    /// when no shard is queued.
    pub oldest_queued_at_ms: Option<i64>,
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
    /// Deletes a finished job: from then on [`JobStore::job`] and the listings answer as if it never
    /// was, and its request id may be used again. Its record stays, hidden, until [`JobStore::purged`]
    /// once its outputs are removed (or kept: `keep_outputs`). Returns the job as it was deleted;
    /// `None` when there is no such job. A job not finished yet is returned as it is, not deleted
    /// (cancel it first).
    async fn delete_job(&self, id: &str, keep_outputs: bool) -> Result<Option<JobRecord>, QueueError>;
    /// Deletes (as [`JobStore::delete_job`]) up to `limit` jobs that finished `retention` ago or
    /// earlier, oldest first; returns their ids.
    async fn expire_jobs(
        &self,
        retention: Duration,
        keep_outputs: bool,
        limit: usize,
    ) -> Result<Vec<String>, QueueError>;
    /// Up to `limit` jobs whose cleanup is due: deleted, or CANCELLED with their outputs still there,
    /// `grace` ago or earlier (a worker that had not yet seen the job end may have written until then).
    async fn jobs_to_purge(&self, grace: Duration, limit: usize) -> Result<Vec<Purge>, QueueError>;
    /// How job `id`'s shards ran, from their records (O(shards of the job)); `None` when there is no
    /// such job.
    async fn shard_stats(&self, id: &str) -> Result<Option<ShardStats>, QueueError>;
    /// Job events the webhooks have yet to get, due now: up to `limit`, oldest first, each this
    /// caller's for `claim` (then handed out again).
    async fn pending_events(&self, limit: usize, claim: Duration) -> Result<Vec<PendingEvent>, QueueError>;
    /// Records how delivering `pending` went: `reached`, the webhooks it has reached; `retry_in`, when
    /// to hand it out again (`None`: done with it, delivered or given up on).
    async fn event_delivered(
        &self,
        pending: &PendingEvent,
        reached: &std::collections::BTreeSet<String>,
        retry_in: Option<Duration>,
    ) -> Result<(), QueueError>;
    /// Records that `purge` was carried out: a deleted job's record and shard tasks are removed, a
    /// cancelled job is not returned by [`JobStore::jobs_to_purge`] again.
    async fn purged(&self, purge: &Purge) -> Result<(), QueueError>;
}

/// A job event on its way to the webhooks ([`JobStore::pending_events`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingEvent {
    pub event: crate::events::JobEvent,
    /// Deliveries tried before this one.
    pub attempts: u32,
    /// The webhooks it has reached.
    pub reached: std::collections::BTreeSet<String>,
    /// The backend's handle on this delivery (SQLite: the event's row; NATS: the message's ack subject).
    pub(crate) receipt: String,
}

/// How a job's shards ran ([`JobStore::shard_stats`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShardStats {
    /// Leases its shards took (a released lease is given back).
    pub attempts: u64,
    /// Shards that took more than one attempt.
    pub retried: u64,
    /// Shards dead-lettered on their own account, not retired because their job ended.
    pub failed: u64,
    /// Shards completed, by the lease owner (`worker/device`) that completed them.
    pub completed_by: std::collections::BTreeMap<String, u64>,
}

/// A job's cleanup ([`JobStore::jobs_to_purge`]): its outputs to delete, its record to remove, or both.
#[derive(Debug, Clone, PartialEq)]
pub struct Purge {
    pub job: JobRecord,
    /// Delete every object of the job: it was deleted (and not told to keep them), or cancelled.
    pub outputs: bool,
    /// Remove the job's record afterwards: it was deleted. A cancelled job's record stays.
    pub record: bool,
}

/// Both halves, as the service uses them.
pub trait Queue: TaskQueue + JobStore {}
impl<T: TaskQueue + JobStore> Queue for T {}

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

impl Lease {
    /// The shard's sample range, from its payload (corrupt when the payload is not one).
    pub fn range(&self) -> Result<crate::job::ShardPayload, QueueError> {
        crate::job::ShardPayload::decode(&self.payload).ok_or_else(|| {
            QueueError::Corrupt(format!("task {}: unreadable shard payload {:?}", self.task_id, self.payload))
        })
    }
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
    /// The queue could not be reached or could not answer now (a server down or busy, a database
    /// locked or out of space). Callers back off and try again; the service maps it to UNAVAILABLE.
    #[error("queue unavailable: {0}")]
    Unavailable(String),
    /// What the queue holds cannot be read: not a passing state, and never retried.
    #[error("queue store is corrupt: {0}")]
    Corrupt(String),
    /// The queue was configured wrongly (a malformed namespace): fix the configuration.
    #[error("queue configuration: {0}")]
    Invalid(String),
}

impl From<rusqlite::Error> for QueueError {
    fn from(e: rusqlite::Error) -> Self {
        QueueError::Unavailable(format!("sqlite: {e}"))
    }
}

/// Which jobs a listing returns: any of `states` (all when empty) carrying every label in `labels`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobFilter {
    pub states: Vec<JobState>,
    pub labels: std::collections::BTreeMap<String, String>,
}

/// Where a page of a listing starts: after the job created at `created_at_ms` with id `id` (newest first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageCursor {
    pub created_at_ms: i64,
    pub id: String,
}
