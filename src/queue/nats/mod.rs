//! A distributed queue backend on NATS JetStream, behind the same [`TaskQueue`] and [`JobStore`]
//! traits as the SQLite store and held to the same conformance suite (`queue::conformance`).
//!
//! # Mapping onto JetStream
//!
//! [`NatsQueue::connect_with`] connects with TLS and credentials ([`NatsClientOptions`]).
//!
//! Every queue lives in a *namespace* (`[A-Za-z0-9_-]+`), so several deployments (or test cases) share
//! one server without seeing each other's data:
//!
//! | What | JetStream object | Notes |
//! |---|---|---|
//! | shard tasks | stream `DDPM_<ns>_TASKS`, work-queue retention, file storage, subjects `ddpm.<ns>.task.<prio>` | one message per shard, published with `Nats-Msg-Id = <job>.<shard>` (publish dedup) |
//! | delivery | one durable pull consumer per priority subject, named `p<prio>` (`p80000000` for priority 0), explicit ack, `AckWait` ([`NatsOptions::ack_wait`]), `MaxDeliver` unlimited | a leased task is an unacknowledged delivery; the served priorities' consumers are created when the queue opens ([`NatsOptions::priorities`]) |
//! | job records | KV bucket `ddpm_<ns>_jobs`, key = job id | every update is a compare-and-swap on the revision |
//! | idempotency keys | KV bucket `ddpm_<ns>_idem`, key = sha256(request id) | create-only: the first submitter wins |
//! | shard state | KV bucket `ddpm_<ns>_shards`, key = `<job>.<shard>` | state, owner, attempt, expiry, last error, the delivery's ack subject; CAS updates |
//! | job events | stream `DDPM_<ns>_EVENTS`, limits retention (7 days), subjects `ddpm.<ns>.events.job.<kind>` | CloudEvents, `Nats-Msg-Id = <job>.<n>`; the durable consumer `webhooks` feeds the webhook dispatch ([`events`]) |
//! | webhooks reached | KV bucket `ddpm_<ns>_hooks`, key = event id | the webhooks an event has reached, while it has others to reach |
//!
//! The KV shard record is the source of truth for a task; the stream message is its ticket in the
//! line. `lease` pulls a message (highest priority subject first), then claims the shard with a CAS
//! from `queued` to `leased` (owner, attempt + 1, expiry) and keeps the message unacknowledged, its ack
//! subject stored in the record. Every write under a lease re-reads the record, checks the fence
//! (`leased`, same owner, same attempt, not expired) and writes with the read revision, so a zombie
//! whose lease expired or was taken over gets [`QueueError::LeaseLost`] and changes nothing. Only after
//! the KV write succeeds is the message told: heartbeat `+WPI` (resets `AckWait`), completion `+ACK`
//! (awaited: "double ack"), [`TaskQueue::retry_later`] `-NAK {delay}` (the server redelivers after the
//! delay), [`TaskQueue::release`] `-NAK`, dead-lettering `+TERM`. Ack replies are awaited, so the
//! server has applied a NAK before the next pull.
//!
//! *Priority*: one subject and consumer per priority; `lease` asks the stream which priority subjects
//! hold messages and pulls from the highest first. Within one priority, order is the stream's: oldest
//! first, with redeliveries (NAKed or timed-out messages) served before new messages, so a retried
//! shard may go ahead of one that has waited longer (the SQLite store puts it behind).
//!
//! *Attempts* are counted in the shard record, not by JetStream's delivery count: a release gives its
//! attempt back, and redeliveries that do not lead to a lease (a delayed or still-held task) do not
//! count. `MaxDeliver` is therefore unlimited and dead-lettering is done by the application
//! (`retry_later`, `reap`, `dead_letter`): the record goes `dead` and keeps the last error, which
//! [`JobStore::jobs_with_dead_shards`] reports.
//!
//! *Expiry*: a lease's expiry is per call (the caller's TTL) and lives in the record. [`TaskQueue::reap`]
//! scans the shard records, requeues (or dead-letters, when attempts are used up) the expired ones with
//! a CAS and NAKs their message for immediate redelivery. If a NAK is lost, the message still comes
//! back after `AckWait`; a delivery of a task whose lease expired but was never reaped is taken over
//! by `lease` itself, with the same attempt accounting as the reaper. Heartbeats must come more often
//! than `AckWait`; a redelivery of a task whose lease is still held is NAKed until the lease's expiry.
//!
//! *Listing* (`list_jobs`, `job_counts`, `jobs_to_finalize`, `jobs_with_dead_shards`, `depth`) scans the
//! KV buckets (latest value per key, one ordered consumer each): O(jobs) or O(shards) per call, fine
//! for the thousands of jobs a batch service keeps, not for millions (those need an index stream).
//!
//! # What it does not guarantee
//!
//! - No multi-key transactions. `submit` claims the idempotency key, writes the job record, then its
//!   shard records and messages. A concurrent resubmission that finds the key but not yet the job waits
//!   for it and, if the first submitter died before writing the job, writes it itself (roll-forward,
//!   create-only, so one record wins). A crash after the job record but before all its shard tasks, or
//!   between a shard's `done` and the job's counters, is repaired by the reconciler that runs in
//!   [`TaskQueue::reap`] (the reference's §2.7 point 5): it counts done shards the job misses (the job
//!   keeps the set of shards it counted, so nothing is counted twice) and, once a job has been quiet for
//!   twice the submit wait, recreates the shard tasks it lacks. Submitting queues the first shards
//!   before it returns and the rest in the background, in bounded windows. `finish_job` writes the
//!   job's terminal state, then retires its shards (the first ones before it returns, the rest in the
//!   background); a shard leased in between is retired by `lease` itself when it sees the terminal
//!   job, fenced out (`LeaseLost`) when its retirement comes, and never counted into a finished job.
//!   A RetryJob of a large job that races the background retirement of its failure can see shards
//!   retired again; the job then fails again and can be retried once more.
//! - JetStream itself: the December 2025 Jepsen analysis of NATS 2.12.1 found acknowledged writes lost
//!   on power failure with the default fsync interval; run the server with `sync_interval: always`
//!   and R3 streams (reference §2.1), and keep outputs idempotent.
//! - Clocks: lease expiry compares the writer's wall clock with the expiry another process wrote, as
//!   with a shared SQLite file; hosts need synchronised clocks (skew shortens or lengthens leases).

pub mod connect;
mod delivery;
mod events;
mod kv;
mod reconcile;
mod records;
pub mod settings;

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv as nats_kv, stream};
use async_trait::async_trait;
use futures_util::{StreamExt, TryStreamExt};
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

pub use self::connect::{ConnectError, NatsAuth, NatsClientOptions, NatsFile, Secret, TlsFault};
use self::delivery::Signal;
use self::kv::{Edit, open_bucket};
use self::records::{
    ShardSet, ShardState, StoredJob, StoredKey, StoredShard, priority_token, shard_key, valid_id,
};
pub use self::settings::NatsSettings;
use super::{
    IdempotencyKey, JobFilter, JobStore, Lease, PageCursor, PendingEvent, Purge, QueueError, ShardStats,
    SubmitOutcome, TaskState, now_ms,
};
use crate::job::{JobRecord, JobSpec, JobState};
use crate::queue::plan::{Shard, plan_shards};

/// Settings of a [`NatsQueue`].
#[derive(Debug, Clone)]
pub struct NatsOptions {
    /// How long the server waits for an ack (or a `+WPI`) before redelivering a task. Heartbeats must
    /// come more often than this.
    pub ack_wait: Duration,
    /// Stream and KV replicas (3 in a cluster, 1 on a single server).
    pub replicas: usize,
    /// How long a concurrent resubmission waits for the job the first submitter is writing before it
    /// writes the job itself.
    pub submit_wait: Duration,
    /// Priorities whose consumers are created when the queue is opened, rather than when a worker
    /// first pulls from them, so that monitoring (an autoscaler reading a consumer's pending count)
    /// sees work queued while no worker runs.
    pub priorities: Option<std::ops::RangeInclusive<i32>>,
}

impl Default for NatsOptions {
    fn default() -> Self {
        // AckWait 60 s as recommended (reference §1.4): short enough for fast takeover with +WPI.
        Self {
            ack_wait: Duration::from_secs(60),
            replicas: 1,
            submit_wait: Duration::from_secs(5),
            priorities: None,
        }
    }
}

/// The JetStream queue and job store of one namespace. Cheap to clone (shares the connection).
#[derive(Clone)]
pub struct NatsQueue {
    client: async_nats::Client,
    js: jetstream::Context,
    tasks: stream::Stream,
    jobs: nats_kv::Store,
    idem: nats_kv::Store,
    shards: nats_kv::Store,
    events: stream::Stream,
    hooks: nats_kv::Store,
    /// The namespace: the CloudEvents `source` of its events is `/ddpm-worker/<namespace>`.
    namespace: String,
    /// `ddpm.<ns>.events.job`: an event's subject is this and its kind.
    events_prefix: String,
    /// The webhook dispatch's consumer, made on its first pull.
    webhooks: std::sync::Arc<tokio::sync::OnceCell<consumer::PullConsumer>>,
    subject_prefix: String,
    stream_name: String,
    options: NatsOptions,
    consumers: std::sync::Arc<Mutex<HashMap<String, consumer::PullConsumer>>>,
}

/// The longest a request to the server (an ack, a KV write) may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Bounds the messages one `lease` call looks at before giving up (stale tickets are acked away).
const MAX_PULLS_PER_LEASE: usize = 1000;

/// Bounds compare-and-swap retries of one update under contention.
const MAX_CAS_TRIES: usize = 1000;

/// Shard records and task messages written at once while queueing a job: publishes are acknowledged
/// one by one, and async-nats refuses more unacknowledged publishes than its ack window (5,000 by
/// default), so a large job is queued as a stream of bounded batches, not all at once.
const PUBLISH_WINDOW: usize = 256;

/// Shards of a new job queued (or of a finished job retired) before the call returns; the rest are
/// handled in the background (a crash in between is repaired by the reconciler, or by `lease` for a
/// finished job's shards), so a job of 20,000 shards is submitted or cancelled as fast as a small one.
const INLINE_SHARDS: usize = 64;

/// Shard records updated at once when a job is retired or retried.
const UPDATE_WINDOW: usize = 64;

/// Why [`NatsQueue::connect_with`] failed: the connection, or opening the namespace on it.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Queue(#[from] QueueError),
}

fn nats_err(context: &str, e: impl std::fmt::Display) -> QueueError {
    QueueError::Unavailable(format!("nats: {context}: {e}"))
}

fn corrupt(context: &str, e: impl std::fmt::Display) -> QueueError {
    QueueError::Corrupt(format!("{context}: {e}"))
}

impl NatsQueue {
    /// Marks the queued or leased shards among `shards` of job `id` dead with `reason`, and terminates
    /// the messages of the leased ones.
    async fn retire_shards(&self, id: &str, shards: &[u64], reason: &str) -> Result<(), QueueError> {
        let retire = |shard: u64| async move {
            let key = shard_key(id, shard);
            let reply = self
                .update::<StoredShard, Option<Option<String>>>(&self.shards, &key, |s| {
                    Ok(match s {
                        Some(mut s) if matches!(s.state, ShardState::Queued | ShardState::Leased) => {
                            let reply = s.ack.clone();
                            s.state = ShardState::Dead;
                            s.retired = true;
                            s.last_error = Some(reason.to_string());
                            s.clear_lease();
                            Edit::Write(s, Some(reply))
                        }
                        _ => Edit::Keep(None),
                    })
                })
                .await?;
            if let Some(reply) = reply {
                self.ack_quietly(reply.as_deref(), Signal::Term).await;
            }
            Ok::<_, QueueError>(())
        };
        futures_util::stream::iter(shards.iter().copied().map(retire))
            .buffer_unordered(UPDATE_WINDOW)
            .try_collect::<()>()
            .await
    }

    /// Connects to `url` without credentials and opens (creating if needed) the stream and buckets of
    /// `namespace`.
    pub async fn connect(url: &str, namespace: &str, options: NatsOptions) -> Result<Self, QueueError> {
        let client = connect::connect(url, &NatsClientOptions::default(), REQUEST_TIMEOUT)
            .await
            .map_err(|e| nats_err(&format!("connecting to {url}"), e))?;
        Self::open(client, namespace, options).await
    }

    /// Connects to `url` with the TLS settings and credentials of `client`; see [`Self::connect`].
    pub async fn connect_with(
        url: &str,
        client: &NatsClientOptions,
        namespace: &str,
        options: NatsOptions,
    ) -> Result<Self, OpenError> {
        let client = connect::connect(url, client, REQUEST_TIMEOUT).await?;
        Ok(Self::open(client, namespace, options).await?)
    }

    /// Opens (creating if needed) the stream and buckets of `namespace` on an existing connection.
    pub async fn open(
        client: async_nats::Client,
        namespace: &str,
        options: NatsOptions,
    ) -> Result<Self, QueueError> {
        if !valid_id(namespace) {
            return Err(QueueError::Invalid(format!("namespace {namespace:?} must match [A-Za-z0-9_-]+")));
        }
        let js = jetstream::new(client.clone());
        let subject_prefix = format!("ddpm.{namespace}.task");
        let stream_name = format!("DDPM_{namespace}_TASKS");
        let tasks = js
            .get_or_create_stream(stream::Config {
                name: stream_name.clone(),
                subjects: vec![format!("{subject_prefix}.>")],
                retention: stream::RetentionPolicy::WorkQueue,
                storage: stream::StorageType::File,
                num_replicas: options.replicas,
                // Publish dedup by Nats-Msg-Id: a resubmitted shard within the window is one message.
                duplicate_window: Duration::from_secs(600),
                ..Default::default()
            })
            .await
            .map_err(|e| nats_err(&format!("creating stream {stream_name}"), e))?;
        let bucket = |name: &str, history: i64| nats_kv::Config {
            bucket: format!("ddpm_{namespace}_{name}"),
            history,
            storage: stream::StorageType::File,
            num_replicas: options.replicas,
            ..Default::default()
        };
        let events_name = format!("DDPM_{namespace}_EVENTS");
        let events = js
            .get_or_create_stream(stream::Config {
                name: events_name.clone(),
                subjects: vec![format!("ddpm.{namespace}.events.>")],
                retention: stream::RetentionPolicy::Limits,
                storage: stream::StorageType::File,
                num_replicas: options.replicas,
                max_age: events::EVENT_MAX_AGE,
                // A republished event (the reconciler's, after a crash) is one message.
                duplicate_window: Duration::from_secs(600),
                ..Default::default()
            })
            .await
            .map_err(|e| nats_err(&format!("creating stream {events_name}"), e))?;
        let jobs = open_bucket(&js, bucket("jobs", 5)).await?;
        let idem = open_bucket(&js, bucket("idem", 1)).await?;
        let shards = open_bucket(&js, bucket("shards", 1)).await?;
        let hooks = open_bucket(&js, bucket("hooks", 1)).await?;
        let queue = Self {
            client,
            js,
            tasks,
            jobs,
            idem,
            shards,
            events,
            hooks,
            namespace: namespace.to_string(),
            events_prefix: format!("ddpm.{namespace}.events.job"),
            webhooks: Default::default(),
            subject_prefix,
            stream_name,
            options,
            consumers: Default::default(),
        };
        for priority in queue.options.priorities.clone().into_iter().flatten() {
            queue.consumer(&priority_token(priority)).await?;
        }
        Ok(queue)
    }

    /// Deletes the namespace's stream and buckets (tests, and tearing a deployment down).
    pub async fn destroy(&self) -> Result<(), QueueError> {
        self.js.delete_stream(&self.stream_name).await.map_err(|e| nats_err("deleting stream", e))?;
        let events = self.events.cached_info().config.name.clone();
        self.js.delete_stream(&events).await.map_err(|e| nats_err("deleting the events stream", e))?;
        for store in [&self.jobs, &self.idem, &self.shards, &self.hooks] {
            self.js
                .delete_key_value(&store.name)
                .await
                .map_err(|e| nats_err(&format!("deleting bucket {}", store.name), e))?;
        }
        Ok(())
    }

    /// The state of one shard task, with its attempts and last error.
    pub async fn task_state(
        &self,
        job_id: &str,
        shard: u64,
    ) -> Result<Option<(TaskState, u32, Option<String>)>, QueueError> {
        if !valid_id(job_id) {
            return Ok(None);
        }
        let record = self.read::<StoredShard>(&self.shards, &shard_key(job_id, shard)).await?;
        Ok(record.map(|(s, _)| (s.state.into(), s.attempts, s.last_error)))
    }
}

#[async_trait]
impl JobStore for NatsQueue {
    async fn submit(
        &self,
        spec: &JobSpec,
        idempotency: Option<&IdempotencyKey>,
        batches_per_shard: u64,
        max_attempts: u32,
    ) -> Result<SubmitOutcome, QueueError> {
        let now = now_ms();
        let shards_total =
            plan_shards(spec.num_samples, u64::from(spec.batch_size), batches_per_shard).len() as u64;
        let fresh = |id: String| StoredJob {
            id,
            spec: spec.clone(),
            state: JobState::Queued,
            samples_done: 0,
            shards_done: 0,
            shards_total,
            created_at: now,
            started_at: None,
            finished_at: None,
            updated_at: now,
            error: None,
            manifest_uri: None,
            batches_per_shard,
            max_attempts,
            counted: ShardSet::default(),
            request_key: idempotency.map(|k| request_key(&k.request_id)),
            events: 0,
            announced: None,
            deleted_at: None,
            keep_outputs: false,
            outputs_removed: false,
        };
        let id = uuid::Uuid::new_v4().to_string();
        if let Some(key) = idempotency {
            // Create-only: of concurrent submitters with one request id, exactly one claims it.
            let idem_key = request_key(&key.request_id);
            let claim = StoredKey {
                request_id: key.request_id.clone(),
                request_hash: key.request_hash.clone(),
                job_id: id.clone(),
            };
            let seen = self
                .update::<StoredKey, Option<StoredKey>>(&self.idem, &idem_key, |seen| {
                    Ok(match seen {
                        Some(seen) => Edit::Keep(Some(seen)),
                        None => Edit::Write(claim.clone(), None),
                    })
                })
                .await?;
            if let Some(seen) = seen {
                if seen.request_hash != key.request_hash {
                    return Err(QueueError::IdempotencyConflict {
                        request_id: key.request_id.clone(),
                        job_id: seen.job_id,
                    });
                }
                let job = self.await_job(fresh(seen.job_id)).await?;
                return Ok(SubmitOutcome { job: job.record(), created: false });
            }
        }
        let job = self.write_job(fresh(id)).await?;
        self.announce_quietly(&job.id).await;
        Ok(SubmitOutcome { job: job.record(), created: true })
    }

    async fn job(&self, id: &str) -> Result<Option<JobRecord>, QueueError> {
        if !valid_id(id) {
            return Ok(None);
        }
        let job = self.read::<StoredJob>(&self.jobs, id).await?;
        Ok(job.filter(|(j, _)| j.deleted_at.is_none()).map(|(j, _)| j.record()))
    }

    async fn list_jobs(
        &self,
        filter: &JobFilter,
        cursor: Option<&PageCursor>,
        limit: usize,
    ) -> Result<Vec<JobRecord>, QueueError> {
        let mut jobs: Vec<StoredJob> = self
            .scan::<StoredJob>(&self.jobs)
            .await?
            .into_iter()
            .filter(|j| j.deleted_at.is_none())
            .filter(|j| filter.states.is_empty() || filter.states.contains(&j.state))
            .filter(|j| filter.labels.iter().all(|(k, v)| j.spec.labels.get(k) == Some(v)))
            .filter(|j| {
                cursor.is_none_or(|c| {
                    j.created_at < c.created_at_ms || (j.created_at == c.created_at_ms && j.id < c.id)
                })
            })
            .collect();
        // Newest first, ties by id descending: the SQLite store's order, so cursors mean the same.
        jobs.sort_unstable_by(|a, b| b.created_at.cmp(&a.created_at).then_with(|| b.id.cmp(&a.id)));
        Ok(jobs.iter().take(limit).map(StoredJob::record).collect())
    }

    async fn complete_shard(&self, lease: &Lease, samples: u64) -> Result<JobRecord, QueueError> {
        // The shard first (fenced), then the job's counters; see the module docs for the gap between.
        self.fenced(lease, |shard, _| {
            shard.state = ShardState::Done;
            shard.samples = Some(samples);
            shard.done_by = Some(lease.owner.clone());
            shard.clear_lease();
            Signal::Ack
        })
        .await?;
        let now = now_ms();
        self.update::<StoredJob, JobRecord>(&self.jobs, &lease.job_id, |job| {
            let Some(mut job) = job else {
                return Err(QueueError::Corrupt(format!("job {} missing", lease.job_id)));
            };
            if job.state.is_terminal() {
                // Finished (cancelled) while the shard ran; its shards are being retired.
                let record = job.record();
                return Ok(Edit::Keep(record));
            }
            if !job.counted.insert(lease.shard) {
                // The reconciler counted it after a crash between the two writes.
                let record = job.record();
                return Ok(Edit::Keep(record));
            }
            job.samples_done += samples;
            job.shards_done += 1;
            if job.state == JobState::Queued {
                job.state = JobState::Running;
            }
            job.started_at = job.started_at.or(Some(now));
            job.updated_at = now;
            let record = job.record();
            Ok(Edit::Write(job, record))
        })
        .await
    }

    async fn finish_job(
        &self,
        id: &str,
        state: JobState,
        error: Option<&str>,
        manifest_uri: Option<&str>,
    ) -> Result<Option<JobRecord>, QueueError> {
        debug_assert!(state.is_terminal());
        if !valid_id(id) {
            return Ok(None);
        }
        let now = now_ms();
        let job = self
            .update::<StoredJob, Option<StoredJob>>(&self.jobs, id, |job| {
                Ok(match job {
                    None => Edit::Keep(None),
                    Some(job) if job.deleted_at.is_some() => Edit::Keep(None),
                    Some(job) if job.state.is_terminal() => Edit::Keep(Some(job)),
                    Some(mut job) => {
                        job.state = state;
                        job.error = error.map(str::to_string);
                        job.manifest_uri = manifest_uri.map(str::to_string);
                        job.finished_at = Some(now);
                        job.updated_at = now;
                        Edit::Write(job.clone(), Some(job))
                    }
                })
            })
            .await?;
        let Some(job) = job else { return Ok(None) };
        // Retire the unfinished shards: a held lease is fenced out and its message terminated; a
        // queued shard's message is terminated when it is next pulled. The first shards are retired
        // before this returns, the rest in the background (a large job has tens of thousands): until
        // then `lease` retires what it pulls of a finished job, and a worker checks the job before it
        // records a shard, so nothing runs or is recorded for the job meanwhile.
        let mut shards: Vec<u64> = (0..job.shards_total).collect();
        let rest = shards.split_off(shards.len().min(INLINE_SHARDS));
        let reason = format!("job {}", state.as_str());
        self.retire_shards(id, &shards, &reason).await?;
        if !rest.is_empty() {
            let (queue, id) = (self.clone(), id.to_string());
            tokio::spawn(async move {
                if let Err(e) = queue.retire_shards(&id, &rest, &reason).await {
                    tracing::warn!(job = %id, error = %e, "retiring the shards of a finished job");
                }
            });
        }
        self.announce_quietly(id).await;
        Ok(Some(job.record()))
    }

    async fn retry_job(&self, id: &str) -> Result<Option<JobRecord>, QueueError> {
        if !valid_id(id) {
            return Ok(None);
        }
        // The job first: while it is RUNNING again, `lease` runs the shards requeued below (a shard
        // leased before then would be retired as belonging to a finished job).
        let now = now_ms();
        let job = self
            .update::<StoredJob, Option<(StoredJob, bool)>>(&self.jobs, id, |job| {
                Ok(match job {
                    None => Edit::Keep(None),
                    Some(job) if job.deleted_at.is_some() => Edit::Keep(None),
                    Some(mut job) if job.state == JobState::Failed => {
                        job.state =
                            if job.started_at.is_some() { JobState::Running } else { JobState::Queued };
                        job.error = None;
                        job.finished_at = None;
                        job.updated_at = now;
                        Edit::Write(job.clone(), Some((job, true)))
                    }
                    Some(job) => Edit::Keep(Some((job, false))),
                })
            })
            .await?;
        let Some((job, retried)) = job else { return Ok(None) };
        if !retried {
            return Ok(Some(job.record()));
        }
        // Dead shards get fresh attempts and a new message (the old one was terminated).
        let revive = |shard: Shard| async move {
            let key = shard_key(id, shard.index);
            let revived = self
                .update::<StoredShard, bool>(&self.shards, &key, |s| {
                    Ok(match s {
                        Some(mut s) if s.state == ShardState::Dead => {
                            s.state = ShardState::Queued;
                            s.retired = false;
                            s.attempts = 0;
                            s.available_at = now;
                            s.last_error = None;
                            s.clear_lease();
                            Edit::Write(s, true)
                        }
                        _ => Edit::Keep(false),
                    })
                })
                .await?;
            if revived {
                self.publish_ticket(id, shard.index, job.spec.priority, format!("{key}.retry{now}")).await?;
            }
            Ok::<_, QueueError>(())
        };
        futures_util::stream::iter(Self::plan(&job).into_iter().map(revive))
            .buffer_unordered(UPDATE_WINDOW)
            .try_collect::<()>()
            .await?;
        // Shards a crash kept from being created are the reconciler's, as for any running job.
        self.announce_quietly(id).await;
        Ok(Some(job.record()))
    }

    async fn jobs_with_dead_shards(&self) -> Result<Vec<(String, String)>, QueueError> {
        let mut dead: Vec<StoredShard> = self
            .scan::<StoredShard>(&self.shards)
            .await?
            .into_iter()
            .filter(|s| s.state == ShardState::Dead)
            .collect();
        dead.sort_unstable_by(|a, b| a.job_id.cmp(&b.job_id).then(a.shard.cmp(&b.shard)));
        dead.dedup_by(|a, b| a.job_id == b.job_id);
        let mut out = Vec::new();
        for shard in dead {
            let unfinished = self
                .read::<StoredJob>(&self.jobs, &shard.job_id)
                .await?
                .is_some_and(|(j, _)| !j.state.is_terminal());
            if unfinished {
                out.push((shard.job_id, shard.last_error.unwrap_or_else(|| "shard failed".into())));
            }
        }
        Ok(out)
    }

    async fn jobs_to_finalize(&self, stale: Duration) -> Result<Vec<String>, QueueError> {
        let cutoff = now_ms() - super::ms(stale);
        let jobs = self.scan::<StoredJob>(&self.jobs).await?;
        Ok(jobs
            .into_iter()
            .filter(|j| {
                j.state == JobState::Running && j.shards_done >= j.shards_total && j.updated_at <= cutoff
            })
            .map(|j| j.id)
            .collect())
    }

    async fn job_counts(&self) -> Result<Vec<(JobState, u64)>, QueueError> {
        let mut counts: Vec<(JobState, u64)> = Vec::new();
        for job in self.scan::<StoredJob>(&self.jobs).await?.into_iter().filter(|j| j.deleted_at.is_none()) {
            match counts.iter_mut().find(|(s, _)| *s == job.state) {
                Some((_, n)) => *n += 1,
                None => counts.push((job.state, 1)),
            }
        }
        Ok(counts)
    }

    async fn delete_job(&self, id: &str, keep_outputs: bool) -> Result<Option<JobRecord>, QueueError> {
        if !valid_id(id) {
            return Ok(None);
        }
        let now = now_ms();
        let job = self
            .update::<StoredJob, Option<(StoredJob, bool)>>(&self.jobs, id, |job| {
                Ok(match job {
                    None => Edit::Keep(None),
                    Some(job) if job.deleted_at.is_some() => Edit::Keep(None),
                    Some(job) if !job.state.is_terminal() => Edit::Keep(Some((job, false))),
                    Some(job) => {
                        let mut deleted = job.clone();
                        deleted.deleted_at = Some(now);
                        deleted.keep_outputs = keep_outputs;
                        deleted.updated_at = now;
                        Edit::Write(deleted, Some((job, true)))
                    }
                })
            })
            .await?;
        let Some((job, deleted)) = job else { return Ok(None) };
        if deleted {
            self.free_request_id(&job).await?;
            self.announce_quietly(id).await;
        }
        Ok(Some(job.record()))
    }

    async fn expire_jobs(
        &self,
        retention: Duration,
        keep_outputs: bool,
        limit: usize,
    ) -> Result<Vec<String>, QueueError> {
        let cutoff = now_ms() - super::ms(retention);
        let mut due: Vec<StoredJob> = self
            .scan::<StoredJob>(&self.jobs)
            .await?
            .into_iter()
            .filter(|j| j.state.is_terminal() && j.deleted_at.is_none())
            .filter(|j| j.finished_at.is_some_and(|t| t <= cutoff))
            .collect();
        due.sort_unstable_by(|a, b| a.finished_at.cmp(&b.finished_at).then_with(|| a.id.cmp(&b.id)));
        let mut expired = Vec::new();
        for job in due.into_iter().take(limit) {
            if self.delete_job(&job.id, keep_outputs).await?.is_some_and(|j| j.state.is_terminal()) {
                expired.push(job.id);
            }
        }
        Ok(expired)
    }

    async fn jobs_to_purge(&self, grace: Duration, limit: usize) -> Result<Vec<Purge>, QueueError> {
        let cutoff = now_ms() - super::ms(grace);
        let mut due: Vec<(i64, Purge)> = self
            .scan::<StoredJob>(&self.jobs)
            .await?
            .into_iter()
            .filter_map(|j| {
                let cancelled = j.state == JobState::Cancelled && !j.outputs_removed;
                let since = match j.deleted_at {
                    Some(at) => at,
                    None if cancelled => j.finished_at?,
                    None => return None,
                };
                let deleted = j.deleted_at.is_some();
                let purge = Purge {
                    outputs: (deleted && !j.keep_outputs) || cancelled,
                    record: deleted,
                    job: j.record(),
                };
                (since <= cutoff).then_some((since, purge))
            })
            .collect();
        due.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.job.id.cmp(&b.1.job.id)));
        Ok(due.into_iter().take(limit).map(|(_, p)| p).collect())
    }

    async fn shard_stats(&self, id: &str) -> Result<Option<ShardStats>, QueueError> {
        let Some(job) = self.job(id).await? else { return Ok(None) };
        // Each of the job's shard records, read directly (a filtered watch of the bucket would wait out
        // its timeout for a job whose records are not there).
        let read =
            |shard: u64| async move { self.read::<StoredShard>(&self.shards, &shard_key(id, shard)).await };
        let shards: Vec<Option<(StoredShard, u64)>> =
            futures_util::stream::iter((0..job.shards_total).map(read))
                .buffered(UPDATE_WINDOW)
                .try_collect()
                .await?;
        let mut stats = ShardStats::default();
        for (shard, _) in shards.into_iter().flatten() {
            stats.attempts += u64::from(shard.attempts);
            stats.retried += u64::from(shard.attempts > 1);
            stats.failed += u64::from(shard.state == ShardState::Dead && !shard.retired);
            if let (ShardState::Done, Some(owner)) = (shard.state, shard.done_by) {
                *stats.completed_by.entry(owner).or_default() += 1;
            }
        }
        Ok(Some(stats))
    }

    async fn pending_events(&self, limit: usize, claim: Duration) -> Result<Vec<PendingEvent>, QueueError> {
        self.pending_webhook_events(limit, claim).await
    }

    async fn event_delivered(
        &self,
        pending: &PendingEvent,
        reached: &std::collections::BTreeSet<String>,
        retry_in: Option<Duration>,
    ) -> Result<(), QueueError> {
        self.webhook_event_delivered(pending, reached, retry_in).await
    }

    async fn purged(&self, purge: &Purge) -> Result<(), QueueError> {
        let id = purge.job.id.as_str();
        if !purge.record {
            return self
                .update::<StoredJob, ()>(&self.jobs, id, |job| {
                    Ok(match job {
                        Some(mut job) if !job.outputs_removed => {
                            job.outputs_removed = true;
                            Edit::Write(job, ())
                        }
                        _ => Edit::Keep(()),
                    })
                })
                .await;
        }
        // The shard records first: a job record without shards is whole, shards without a job are not.
        let purge_key = |key: String| async move {
            self.shards.purge(&key).await.map_err(|e| nats_err(&format!("purging {key}"), e))
        };
        futures_util::stream::iter((0..purge.job.shards_total).map(|shard| purge_key(shard_key(id, shard))))
            .buffer_unordered(UPDATE_WINDOW)
            .try_collect::<()>()
            .await?;
        self.jobs.purge(id).await.map_err(|e| nats_err(&format!("purging job {id}"), e))
    }
}

/// The idempotency bucket's key for a request id (a digest: request ids are free text).
fn request_key(request_id: &str) -> String {
    hex::encode(Sha256::digest(request_id.as_bytes()))
}

impl NatsQueue {
    /// Removes the idempotency key that made `job`, if it still names that job, so that its request id
    /// may be used again.
    async fn free_request_id(&self, job: &StoredJob) -> Result<(), QueueError> {
        let Some(key) = job.request_key.clone() else { return Ok(()) };
        let Some((seen, revision)) = self.read::<StoredKey>(&self.idem, &key).await? else { return Ok(()) };
        if seen.job_id != job.id {
            return Ok(());
        }
        match self.idem.purge_expect_revision(&key, Some(revision)).await {
            Ok(()) => Ok(()),
            // Written again meanwhile: it names another job now, which keeps it.
            Err(e) if e.to_string().contains("wrong last sequence") => Ok(()),
            Err(e) => Err(nats_err(&format!("freeing request id key {key}"), e)),
        }
    }
}
