//! A distributed queue backend on NATS JetStream, behind the same [`TaskQueue`] and [`JobStore`]
//! traits as the SQLite store and held to the same conformance suite (`queue::conformance`).
//!
//! # Mapping onto JetStream
//!
//! Every queue lives in a *namespace* (`[A-Za-z0-9_-]+`), so several deployments (or test cases) share
//! one server without seeing each other's data:
//!
//! | What | JetStream object | Notes |
//! |---|---|---|
//! | shard tasks | stream `DDPM_<ns>_TASKS`, work-queue retention, file storage, subjects `ddpm.<ns>.task.<prio>` | one message per shard, published with `Nats-Msg-Id = <job>.<shard>` (publish dedup) |
//! | delivery | one durable pull consumer per priority subject, explicit ack, `AckWait` ([`NatsOptions::ack_wait`]), `MaxDeliver` unlimited | a leased task is an unacknowledged delivery |
//! | job records | KV bucket `ddpm_<ns>_jobs`, key = job id | every update is a compare-and-swap on the revision |
//! | idempotency keys | KV bucket `ddpm_<ns>_idem`, key = sha256(request id) | create-only: the first submitter wins |
//! | shard state | KV bucket `ddpm_<ns>_shards`, key = `<job>.<shard>` | state, owner, attempt, expiry, last error, the delivery's ack subject; CAS updates |
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
//!   twice the submit wait, recreates the shard tasks it lacks. `finish_job` writes the job's terminal state,
//!   then retires its shards one by one; a shard leased in between is retired by `lease` itself when
//!   it sees the terminal job, or fenced out (`LeaseLost`) when `finish_job` gets to it.
//! - JetStream itself: the December 2025 Jepsen analysis of NATS 2.12.1 found acknowledged writes lost
//!   on power failure with the default fsync interval; run the server with `sync_interval: always`
//!   and R3 streams (reference §2.1), and keep outputs idempotent.
//! - Clocks: lease expiry compares the writer's wall clock with the expiry another process wrote, as
//!   with a shared SQLite file; hosts need synchronised clocks (skew shortens or lengthens leases).

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, stream};
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

use super::{
    IdempotencyKey, JobFilter, JobStore, Lease, PageCursor, QueueError, ReapReport, SubmitOutcome, TaskQueue,
    TaskState, now_ms,
};
use crate::job::{JobRecord, JobSpec, JobState, ShardPayload};
use crate::worker::planner::{Shard, plan_shards};

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
}

impl Default for NatsOptions {
    fn default() -> Self {
        // AckWait 60 s as recommended (reference §1.4): short enough for fast takeover with +WPI.
        Self { ack_wait: Duration::from_secs(60), replicas: 1, submit_wait: Duration::from_secs(5) }
    }
}

/// The JetStream queue and job store of one namespace. Cheap to clone (shares the connection).
#[derive(Clone)]
pub struct NatsQueue {
    client: async_nats::Client,
    js: jetstream::Context,
    tasks: stream::Stream,
    jobs: kv::Store,
    idem: kv::Store,
    shards: kv::Store,
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
/// Shards of a new job queued before SubmitJob returns; the rest are queued in the background (a crash
/// in between is repaired by the reconciler), so submitting a job of 20,000 shards takes no longer
/// than one of a few hundred.
const INLINE_SHARDS: usize = 512;
/// Shard records updated at once when a job is retired or retried.
const UPDATE_WINDOW: usize = 64;

fn nats_err(context: &str, e: impl std::fmt::Display) -> QueueError {
    QueueError::Nats(format!("{context}: {e}"))
}

fn corrupt(context: &str, e: impl std::fmt::Display) -> QueueError {
    QueueError::Corrupt(format!("{context}: {e}"))
}

/// A job as stored in the jobs bucket.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredJob {
    id: String,
    spec: JobSpec,
    state: JobState,
    samples_done: u64,
    shards_done: u64,
    shards_total: u64,
    created_at: i64,
    started_at: Option<i64>,
    finished_at: Option<i64>,
    updated_at: i64,
    error: Option<String>,
    manifest_uri: Option<String>,
    /// Kept so that a roll-forward rebuilds exactly the shards the first submitter planned.
    batches_per_shard: u64,
    max_attempts: u32,
    /// The shards `samples_done` and `shards_done` include.
    #[serde(default)]
    counted: ShardSet,
}

/// A set of shard indices, one bit each (hex in JSON: 2 KB for 15,000 shards). Counting a completion
/// into a job is "insert, and add only if new", so `complete_shard` and the reconciler can never both
/// count one shard.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct ShardSet(Vec<u8>);

impl ShardSet {
    fn contains(&self, shard: u64) -> bool {
        self.0.get((shard / 8) as usize).is_some_and(|b| b & (1 << (shard % 8)) != 0)
    }

    /// Adds `shard`; `false` when it was already there.
    fn insert(&mut self, shard: u64) -> bool {
        let (byte, bit) = ((shard / 8) as usize, 1u8 << (shard % 8));
        if self.0.len() <= byte {
            self.0.resize(byte + 1, 0);
        }
        let new = self.0[byte] & bit == 0;
        self.0[byte] |= bit;
        new
    }
}

impl Serialize for ShardSet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for ShardSet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        hex::decode(text).map(ShardSet).map_err(serde::de::Error::custom)
    }
}

impl StoredJob {
    fn record(&self) -> JobRecord {
        JobRecord {
            id: self.id.clone(),
            spec: self.spec.clone(),
            state: self.state,
            samples_done: self.samples_done,
            shards_done: self.shards_done,
            shards_total: self.shards_total,
            created_at_ms: self.created_at,
            started_at_ms: self.started_at,
            finished_at_ms: self.finished_at,
            error: self.error.clone(),
            manifest_uri: self.manifest_uri.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum ShardState {
    Queued,
    Leased,
    Done,
    Dead,
}

impl From<ShardState> for TaskState {
    fn from(s: ShardState) -> Self {
        match s {
            ShardState::Queued => TaskState::Queued,
            ShardState::Leased => TaskState::Leased,
            ShardState::Done => TaskState::Done,
            ShardState::Dead => TaskState::Dead,
        }
    }
}

/// A shard task as stored in the shards bucket.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredShard {
    job_id: String,
    shard: u64,
    priority: i32,
    payload: String,
    state: ShardState,
    /// Leases taken and not given back (`release` gives one back).
    attempts: u32,
    max_attempts: u32,
    available_at: i64,
    owner: Option<String>,
    expires_at: Option<i64>,
    /// The ack subject of the delivery the current lease holds.
    ack: Option<String>,
    /// The stream sequence of the task's message: the lease's `task_id`.
    seq: Option<u64>,
    last_error: Option<String>,
    samples: Option<u64>,
}

impl StoredShard {
    fn held_by(&self, lease: &Lease, now: i64) -> bool {
        self.state == ShardState::Leased
            && self.owner.as_deref() == Some(lease.owner.as_str())
            && self.attempts == lease.attempt
            && self.expires_at.is_some_and(|e| e >= now)
    }

    fn clear_lease(&mut self) {
        self.owner = None;
        self.expires_at = None;
        self.ack = None;
    }
}

/// An idempotency record: which job a request id made, and the request's hash.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredKey {
    request_id: String,
    request_hash: String,
    job_id: String,
}

/// The body of a task message.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Ticket {
    job_id: String,
    shard: u64,
}

/// What to tell the server about a delivery.
#[derive(Debug, Clone, Copy)]
enum Signal {
    Ack,
    Progress,
    Nak(Option<Duration>),
    Term,
}

impl Signal {
    fn body(self) -> Bytes {
        // The JetStream ack protocol (ADR-1 in nats-io/nats-architecture-and-design): `+ACK`, `+WPI`,
        // `-NAK` with an optional JSON delay in nanoseconds, `+TERM`.
        match self {
            Signal::Ack => Bytes::from_static(b"+ACK"),
            Signal::Progress => Bytes::from_static(b"+WPI"),
            Signal::Nak(None) => Bytes::from_static(b"-NAK"),
            Signal::Nak(Some(d)) => Bytes::from(format!("-NAK {{\"delay\": {}}}", d.as_nanos())),
            Signal::Term => Bytes::from_static(b"+TERM"),
        }
    }
}

/// A priority as a subject token whose byte order is the numeric order (sign bit flipped, hex).
fn priority_token(priority: i32) -> String {
    format!("{:08x}", (priority as u32) ^ 0x8000_0000)
}

fn shard_key(job_id: &str, shard: u64) -> String {
    format!("{job_id}.{shard}")
}

/// KV keys and job ids we accept: what a uuid needs, no subject wildcards or separators.
fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn ms_duration(ms: i64) -> Duration {
    Duration::from_millis(ms.max(0) as u64)
}

fn encode<T: Serialize>(value: &T) -> Result<Bytes, QueueError> {
    serde_json::to_vec(value).map(Bytes::from).map_err(|e| corrupt("encoding a record", e))
}

fn decode<T: for<'de> Deserialize<'de>>(what: &str, bytes: &[u8]) -> Result<T, QueueError> {
    serde_json::from_slice(bytes).map_err(|e| corrupt(what, e))
}

/// What a CAS update closure decides.
enum Edit<T, R> {
    /// Write this value, then return `R`.
    Write(T, R),
    /// Write nothing and return `R`.
    Keep(R),
}

impl NatsQueue {
    /// Connects to `url` and opens (creating if needed) the stream and buckets of `namespace`.
    pub async fn connect(url: &str, namespace: &str, options: NatsOptions) -> Result<Self, QueueError> {
        let client = async_nats::ConnectOptions::new()
            .request_timeout(Some(REQUEST_TIMEOUT))
            .connect(url)
            .await
            .map_err(|e| nats_err(&format!("connecting to {url}"), e))?;
        Self::open(client, namespace, options).await
    }

    /// Opens (creating if needed) the stream and buckets of `namespace` on an existing connection.
    pub async fn open(
        client: async_nats::Client,
        namespace: &str,
        options: NatsOptions,
    ) -> Result<Self, QueueError> {
        if !valid_id(namespace) {
            return Err(QueueError::Nats(format!("namespace {namespace:?} must match [A-Za-z0-9_-]+")));
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
        let bucket = |name: &str, history: i64| kv::Config {
            bucket: format!("ddpm_{namespace}_{name}"),
            history,
            storage: stream::StorageType::File,
            num_replicas: options.replicas,
            ..Default::default()
        };
        let jobs = open_bucket(&js, bucket("jobs", 5)).await?;
        let idem = open_bucket(&js, bucket("idem", 1)).await?;
        let shards = open_bucket(&js, bucket("shards", 1)).await?;
        Ok(Self {
            client,
            js,
            tasks,
            jobs,
            idem,
            shards,
            subject_prefix,
            stream_name,
            options,
            consumers: Default::default(),
        })
    }

    /// Deletes the namespace's stream and buckets (tests, and tearing a deployment down).
    pub async fn destroy(&self) -> Result<(), QueueError> {
        self.js.delete_stream(&self.stream_name).await.map_err(|e| nats_err("deleting stream", e))?;
        for store in [&self.jobs, &self.idem, &self.shards] {
            self.js
                .delete_key_value(&store.name)
                .await
                .map_err(|e| nats_err(&format!("deleting bucket {}", store.name), e))?;
        }
        Ok(())
    }

    // === KV helpers ===

    async fn read<T: for<'de> Deserialize<'de>>(
        &self,
        store: &kv::Store,
        key: &str,
    ) -> Result<Option<(T, u64)>, QueueError> {
        let entry = store.entry(key).await.map_err(|e| nats_err(&format!("reading {key}"), e))?;
        match entry {
            Some(e) if e.operation == kv::Operation::Put => {
                Ok(Some((decode(&format!("{} {key}", store.name), &e.value)?, e.revision)))
            }
            _ => Ok(None),
        }
    }

    /// Read-modify-write of one key with compare-and-swap on its revision, retried on a conflict.
    async fn update<T, R>(
        &self,
        store: &kv::Store,
        key: &str,
        mut edit: impl FnMut(Option<T>) -> Result<Edit<T, R>, QueueError>,
    ) -> Result<R, QueueError>
    where
        T: Serialize + for<'de> Deserialize<'de>,
    {
        for _ in 0..MAX_CAS_TRIES {
            let current = self.read::<T>(store, key).await?;
            let revision = current.as_ref().map(|(_, r)| *r);
            match edit(current.map(|(v, _)| v))? {
                Edit::Keep(r) => return Ok(r),
                Edit::Write(value, r) => {
                    let body = encode(&value)?;
                    let written =
                        match revision {
                            Some(rev) => store.update(key, body, rev).await.map(|_| ()).map_err(|e| {
                                (e.kind() == kv::UpdateErrorKind::WrongLastRevision, e.to_string())
                            }),
                            None => {
                                store.create(key, body).await.map(|_| ()).map_err(|e| {
                                    (e.kind() == kv::CreateErrorKind::AlreadyExists, e.to_string())
                                })
                            }
                        };
                    match written {
                        Ok(()) => return Ok(r),
                        Err((true, _)) => continue,
                        Err((false, e)) => return Err(nats_err(&format!("writing {key}"), e)),
                    }
                }
            }
        }
        Err(QueueError::Nats(format!("{key}: too much contention ({MAX_CAS_TRIES} tries)")))
    }

    /// The latest value of every key in `store`.
    async fn scan<T: for<'de> Deserialize<'de>>(&self, store: &kv::Store) -> Result<Vec<T>, QueueError> {
        // Fresh stream info (`Store::status` is cached): an empty bucket would leave the watch silent.
        let info = store.stream.get_info().await.map_err(|e| nats_err(&format!("{} info", store.name), e))?;
        if info.state.messages == 0 {
            return Ok(Vec::new());
        }
        // An ordered consumer delivering the last message per key; `delta` counts what is left.
        let mut watch = store
            .watch_with_history(">")
            .await
            .map_err(|e| nats_err(&format!("scanning {}", store.name), e))?;
        let mut out = Vec::new();
        loop {
            let next = tokio::time::timeout(REQUEST_TIMEOUT, watch.next())
                .await
                .map_err(|_| QueueError::Nats(format!("scanning {}: timed out", store.name)))?;
            let Some(entry) = next else { break };
            let entry = entry.map_err(|e| nats_err(&format!("scanning {}", store.name), e))?;
            if entry.operation == kv::Operation::Put {
                out.push(decode(&format!("{} {}", store.name, entry.key), &entry.value)?);
            }
            if entry.delta == 0 {
                break;
            }
        }
        Ok(out)
    }

    // === messages ===

    /// Sends `ack` for the delivery whose ack subject is `reply` and waits for the server's reply.
    async fn ack(&self, reply: &str, ack: Signal) -> Result<(), QueueError> {
        self.client
            .request(reply.to_string(), ack.body())
            .await
            .map(|_| ())
            .map_err(|e| nats_err(&format!("ack {ack:?}"), e))
    }

    /// Like [`Self::ack`] after the KV write already decided the outcome: a lost ack only means the
    /// server redelivers after `AckWait`, and the next lease sorts it out from the KV record.
    async fn ack_quietly(&self, reply: Option<&str>, ack: Signal) {
        if let Some(reply) = reply
            && let Err(e) = self.ack(reply, ack).await
        {
            tracing::warn!(error = %e, "task message ack failed; the server will redeliver after AckWait");
        }
    }

    async fn consumer(&self, token: &str) -> Result<consumer::PullConsumer, QueueError> {
        let mut consumers = self.consumers.lock().await;
        if let Some(c) = consumers.get(token) {
            return Ok(c.clone());
        }
        let name = format!("p{token}");
        let c = self
            .tasks
            .get_or_create_consumer(
                &name,
                consumer::pull::Config {
                    durable_name: Some(name.clone()),
                    filter_subject: format!("{}.{token}", self.subject_prefix),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: self.options.ack_wait,
                    // Attempts are counted in KV (a release gives one back); see the module docs.
                    max_deliver: -1,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| nats_err(&format!("consumer {name}"), e))?;
        consumers.insert(token.to_string(), c.clone());
        Ok(c)
    }

    /// Priority tokens with messages in the stream, highest first.
    async fn ready_priorities(&self) -> Result<Vec<String>, QueueError> {
        let mut info = self
            .tasks
            .info_with_subjects(format!("{}.>", self.subject_prefix))
            .await
            .map_err(|e| nats_err("stream subjects", e))?;
        let mut tokens = Vec::new();
        while let Some(item) = info.next().await {
            let (subject, count) = item.map_err(|e| nats_err("stream subjects", e))?;
            if count > 0
                && let Some(token) = subject.rsplit('.').next()
            {
                tokens.push(token.to_string());
            }
        }
        tokens.sort_unstable_by(|a, b| b.cmp(a));
        tokens.dedup();
        Ok(tokens)
    }

    /// Creates the shard records of `job` that are missing and publishes their task messages, at most
    /// [`PUBLISH_WINDOW`] at a time. Idempotent: records are create-only and messages carry a dedup id.
    /// `fresh_ids` names the messages apart from earlier publishes (the reconciler's republish must not
    /// be dropped as a duplicate of a message that was consumed); then only shards whose record had to
    /// be created are published.
    async fn ensure_shards(
        &self,
        job: &StoredJob,
        shards: &[Shard],
        fresh_ids: Option<i64>,
    ) -> Result<(), QueueError> {
        let now = now_ms();
        let subject = format!("{}.{}", self.subject_prefix, priority_token(job.spec.priority));
        let queue_one = |shard: Shard| {
            let subject = subject.clone();
            async move {
                let payload = serde_json::to_string(&ShardPayload { start: shard.start, end: shard.end })
                    .map_err(|e| corrupt("shard payload", e))?;
                let record = StoredShard {
                    job_id: job.id.clone(),
                    shard: shard.index,
                    priority: job.spec.priority,
                    payload,
                    state: ShardState::Queued,
                    attempts: 0,
                    max_attempts: job.max_attempts,
                    available_at: now,
                    owner: None,
                    expires_at: None,
                    ack: None,
                    seq: None,
                    last_error: None,
                    samples: None,
                };
                let key = shard_key(&job.id, shard.index);
                match self.shards.create(&key, encode(&record)?).await {
                    Ok(_) => {}
                    Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists && fresh_ids.is_some() => {
                        return Ok(());
                    }
                    // Created earlier, perhaps without its message (a crash in between): publish it.
                    Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
                    Err(e) => return Err(nats_err(&format!("creating {key}"), e)),
                }
                let ticket = encode(&Ticket { job_id: job.id.clone(), shard: shard.index })?;
                let id = match fresh_ids {
                    Some(at) => format!("{key}.r{at}"),
                    None => key.clone(),
                };
                let message = jetstream::message::PublishMessage::build().payload(ticket).message_id(id);
                let ack = self
                    .js
                    .send_publish(subject, message)
                    .await
                    .map_err(|e| nats_err(&format!("publishing {key}"), e))?;
                // Durable once acknowledged.
                ack.await.map_err(|e| nats_err(&format!("publishing {key}"), e))?;
                Ok::<_, QueueError>(())
            }
        };
        futures_util::stream::iter(shards.iter().copied().map(queue_one))
            .buffer_unordered(PUBLISH_WINDOW)
            .try_collect::<()>()
            .await
    }

    /// The shards of `job` as its submitter planned them.
    fn plan(job: &StoredJob) -> Vec<Shard> {
        plan_shards(job.spec.num_samples, u64::from(job.spec.batch_size), job.batches_per_shard)
    }

    /// Repairs what a crash between two writes leaves behind (there are no multi-key transactions):
    /// shards recorded done that their job's counters miss (a crash inside `complete_shard`), and a
    /// job whose shard records were not all created (a crash inside `submit`), once it has been left
    /// alone for twice the submit wait. `shards` is a scan of the shards bucket.
    async fn reconcile(&self, shards: &[StoredShard]) -> Result<(), QueueError> {
        let mut by_job: HashMap<&str, Vec<&StoredShard>> = HashMap::new();
        for s in shards {
            by_job.entry(s.job_id.as_str()).or_default().push(s);
        }
        for job in self.scan::<StoredJob>(&self.jobs).await? {
            if job.state.is_terminal() {
                continue;
            }
            let records = by_job.get(job.id.as_str()).map(Vec::as_slice).unwrap_or_default();
            let recorded: std::collections::HashSet<u64> = records.iter().map(|s| s.shard).collect();
            let uncounted: Vec<(u64, u64)> = records
                .iter()
                .filter(|s| s.state == ShardState::Done && !job.counted.contains(s.shard))
                .map(|s| (s.shard, s.samples.unwrap_or(0)))
                .collect();
            if !uncounted.is_empty() {
                let added = self
                    .update::<StoredJob, usize>(&self.jobs, &job.id, |current| {
                        let Some(mut j) = current else { return Ok(Edit::Keep(0)) };
                        let mut added = 0;
                        for (shard, samples) in &uncounted {
                            if j.counted.insert(*shard) {
                                j.samples_done += samples;
                                j.shards_done += 1;
                                added += 1;
                            }
                        }
                        if added == 0 {
                            return Ok(Edit::Keep(0));
                        }
                        j.updated_at = now_ms();
                        Ok(Edit::Write(j, added))
                    })
                    .await?;
                if added > 0 {
                    tracing::warn!(job = %job.id, shards = added, "reconciled completed shards missing from the job's counters");
                }
            }
            let quiet = now_ms() - job.updated_at > 2 * super::ms(self.options.submit_wait);
            if (records.len() as u64) < job.shards_total && quiet {
                tracing::warn!(job = %job.id, records = records.len(), total = job.shards_total, "recreating missing shard tasks");
                let missing: Vec<Shard> =
                    Self::plan(&job).into_iter().filter(|s| !recorded.contains(&s.index)).collect();
                self.ensure_shards(&job, &missing, Some(now_ms())).await?;
            }
        }
        Ok(())
    }

    /// Writes a new job (create-only) and queues its shards. If the job already exists (a concurrent
    /// roll-forward won), its stored plan is what gets queued.
    async fn write_job(&self, job: StoredJob) -> Result<StoredJob, QueueError> {
        let stored = match self.jobs.create(&job.id, encode(&job)?).await {
            Ok(_) => job,
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => self
                .read::<StoredJob>(&self.jobs, &job.id)
                .await?
                .map(|(j, _)| j)
                .ok_or_else(|| QueueError::Corrupt(format!("job {} vanished", job.id)))?,
            Err(e) => return Err(nats_err(&format!("creating job {}", job.id), e)),
        };
        let mut shards = Self::plan(&stored);
        let rest = shards.split_off(shards.len().min(INLINE_SHARDS));
        self.ensure_shards(&stored, &shards, None).await?;
        if !rest.is_empty() {
            let (queue, job) = (self.clone(), stored.clone());
            tokio::spawn(async move {
                if let Err(e) = queue.ensure_shards(&job, &rest, None).await {
                    tracing::warn!(job = %job.id, error = %e, "queueing shards; the reconciler will finish it");
                }
            });
        }
        Ok(stored)
    }

    /// Waits for the job an idempotency key points at; writes it from `fresh` if its submitter died.
    async fn await_job(&self, fresh: StoredJob) -> Result<StoredJob, QueueError> {
        let deadline = tokio::time::Instant::now() + self.options.submit_wait;
        loop {
            if let Some((job, _)) = self.read::<StoredJob>(&self.jobs, &fresh.id).await? {
                return Ok(job);
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(job = %fresh.id, "idempotency key without its job: writing the job");
                return self.write_job(fresh).await;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Marks a job running (its first lease). Returns the job's state, `None` when it is missing.
    async fn mark_running(&self, job_id: &str, now: i64) -> Result<Option<JobState>, QueueError> {
        self.update::<StoredJob, Option<JobState>>(&self.jobs, job_id, |job| {
            Ok(match job {
                Some(mut job) if job.state == JobState::Queued => {
                    job.state = JobState::Running;
                    job.started_at = job.started_at.or(Some(now));
                    job.updated_at = now;
                    Edit::Write(job, Some(JobState::Running))
                }
                job => Edit::Keep(job.map(|j| j.state)),
            })
        })
        .await
    }

    /// Tries to lease the task a delivered message stands for. `None`: the message was dealt with
    /// (stale, delayed or held) and the caller should pull the next one.
    async fn claim(
        &self,
        msg: &jetstream::Message,
        owner: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>, QueueError> {
        let reply = msg.reply.as_ref().map(|r| r.to_string());
        let seq = msg.info().map(|i| i.stream_sequence).ok();
        let ticket: Ticket = match serde_json::from_slice(&msg.payload) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "unreadable task message; terminating it");
                self.ack_quietly(reply.as_deref(), Signal::Term).await;
                return Ok(None);
            }
        };
        let key = shard_key(&ticket.job_id, ticket.shard);
        let now = now_ms();
        let expires_at = now.saturating_add(super::ms(ttl));
        enum Verdict {
            Leased(Lease),
            Drop(Signal),
        }
        let verdict = self
            .update::<StoredShard, Verdict>(&self.shards, &key, |shard| {
                let Some(mut shard) = shard else { return Ok(Edit::Keep(Verdict::Drop(Signal::Term))) };
                let available = match shard.state {
                    ShardState::Done => return Ok(Edit::Keep(Verdict::Drop(Signal::Ack))),
                    ShardState::Dead => return Ok(Edit::Keep(Verdict::Drop(Signal::Term))),
                    ShardState::Queued if shard.available_at > now => {
                        let delay = ms_duration(shard.available_at - now);
                        return Ok(Edit::Keep(Verdict::Drop(Signal::Nak(Some(delay)))));
                    }
                    ShardState::Queued => true,
                    ShardState::Leased => match shard.expires_at {
                        // Redelivered after AckWait while the lease is still held: back at its expiry.
                        Some(e) if e >= now => {
                            let delay = ms_duration(e - now + 1);
                            return Ok(Edit::Keep(Verdict::Drop(Signal::Nak(Some(delay)))));
                        }
                        // Expired and not reaped yet: the reaper's accounting, done here.
                        _ => false,
                    },
                };
                if !available && shard.attempts >= shard.max_attempts {
                    shard.state = ShardState::Dead;
                    shard.last_error = Some("lease expired after the last attempt".into());
                    shard.clear_lease();
                    return Ok(Edit::Write(shard, Verdict::Drop(Signal::Term)));
                }
                if !available {
                    shard.last_error = Some("lease expired".into());
                }
                shard.state = ShardState::Leased;
                shard.attempts += 1;
                shard.owner = Some(owner.to_string());
                shard.expires_at = Some(expires_at);
                shard.ack = reply.clone();
                shard.seq = seq;
                let lease = Lease {
                    task_id: seq.unwrap_or_default() as i64,
                    job_id: shard.job_id.clone(),
                    shard: shard.shard,
                    payload: shard.payload.clone(),
                    owner: owner.to_string(),
                    attempt: shard.attempts,
                    expires_at,
                };
                Ok(Edit::Write(shard, Verdict::Leased(lease)))
            })
            .await?;
        match verdict {
            Verdict::Leased(lease) => match self.mark_running(&lease.job_id, now).await? {
                Some(state) if !state.is_terminal() => Ok(Some(lease)),
                // The job finished while its shards were being retired (finish_job is not one
                // transaction): retire this one too instead of running it.
                state => {
                    let reason = state.map_or("job missing".to_string(), |s| format!("job {}", s.as_str()));
                    self.fenced(&lease, |shard, _| {
                        shard.state = ShardState::Dead;
                        shard.last_error = Some(reason.clone());
                        shard.clear_lease();
                        Signal::Term
                    })
                    .await?;
                    Ok(None)
                }
            },
            Verdict::Drop(ack) => {
                self.ack_quietly(reply.as_deref(), ack).await;
                Ok(None)
            }
        }
    }

    /// A fenced write under `lease`: `edit` runs on the record only while the lease holds it, and what
    /// it returns is sent for the lease's delivery after the write.
    async fn fenced(
        &self,
        lease: &Lease,
        mut edit: impl FnMut(&mut StoredShard, i64) -> Signal,
    ) -> Result<StoredShard, QueueError> {
        let key = shard_key(&lease.job_id, lease.shard);
        let lost = QueueError::LeaseLost { task_id: lease.task_id };
        let outcome = self
            .update::<StoredShard, Option<(Signal, Option<String>, StoredShard)>>(
                &self.shards,
                &key,
                |shard| {
                    let now = now_ms();
                    match shard {
                        Some(mut shard) if shard.held_by(lease, now) => {
                            let reply = shard.ack.clone();
                            let ack = edit(&mut shard, now);
                            Ok(Edit::Write(shard.clone(), Some((ack, reply, shard))))
                        }
                        _ => Ok(Edit::Keep(None)),
                    }
                },
            )
            .await?;
        let Some((ack, reply, shard)) = outcome else { return Err(lost) };
        self.ack_quietly(reply.as_deref(), ack).await;
        Ok(shard)
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

async fn open_bucket(js: &jetstream::Context, config: kv::Config) -> Result<kv::Store, QueueError> {
    let name = config.bucket.clone();
    match js.get_key_value(&name).await {
        Ok(store) => Ok(store),
        Err(_) => {
            js.create_key_value(config).await.map_err(|e| nats_err(&format!("creating bucket {name}"), e))
        }
    }
}

#[async_trait]
impl TaskQueue for NatsQueue {
    async fn lease(&self, owner: &str, ttl: Duration) -> Result<Option<Lease>, QueueError> {
        let mut pulls = 0;
        for token in self.ready_priorities().await? {
            let consumer = self.consumer(&token).await?;
            loop {
                if pulls >= MAX_PULLS_PER_LEASE {
                    return Ok(None);
                }
                pulls += 1;
                // No-wait pull of one message: nothing pending ends the batch at once.
                let mut batch = consumer
                    .fetch()
                    .max_messages(1)
                    .messages()
                    .await
                    .map_err(|e| nats_err("pulling a task", e))?;
                let Some(msg) = batch.next().await else { break };
                let msg = msg.map_err(|e| nats_err("pulling a task", e))?;
                if let Some(lease) = self.claim(&msg, owner, ttl).await? {
                    return Ok(Some(lease));
                }
            }
        }
        Ok(None)
    }

    async fn heartbeat(&self, lease: &mut Lease, ttl: Duration) -> Result<(), QueueError> {
        let mut expires = 0;
        self.fenced(lease, |shard, now| {
            expires = now.saturating_add(super::ms(ttl));
            shard.expires_at = Some(expires);
            Signal::Progress
        })
        .await?;
        lease.expires_at = expires;
        Ok(())
    }

    async fn release(&self, lease: &Lease, delay: Duration, reason: &str) -> Result<(), QueueError> {
        self.fenced(lease, |shard, now| {
            shard.state = ShardState::Queued;
            shard.attempts = shard.attempts.saturating_sub(1);
            shard.available_at = now.saturating_add(super::ms(delay));
            shard.last_error = Some(reason.to_string());
            shard.clear_lease();
            Signal::Nak((!delay.is_zero()).then_some(delay))
        })
        .await
        .map(|_| ())
    }

    async fn retry_later(&self, lease: &Lease, delay: Duration, error: &str) -> Result<(), QueueError> {
        self.fenced(lease, |shard, now| {
            shard.last_error = Some(error.to_string());
            shard.clear_lease();
            if shard.attempts >= shard.max_attempts {
                shard.state = ShardState::Dead;
                Signal::Term
            } else {
                shard.state = ShardState::Queued;
                shard.available_at = now.saturating_add(super::ms(delay));
                Signal::Nak((!delay.is_zero()).then_some(delay))
            }
        })
        .await
        .map(|_| ())
    }

    async fn dead_letter(&self, lease: &Lease, error: &str) -> Result<(), QueueError> {
        self.fenced(lease, |shard, _| {
            shard.state = ShardState::Dead;
            shard.last_error = Some(error.to_string());
            shard.clear_lease();
            Signal::Term
        })
        .await
        .map(|_| ())
    }

    async fn reap(&self) -> Result<ReapReport, QueueError> {
        let mut report = ReapReport::default();
        let shards = self.scan::<StoredShard>(&self.shards).await?;
        for shard in shards.iter().cloned() {
            if shard.state != ShardState::Leased || shard.expires_at.is_none_or(|e| e >= now_ms()) {
                continue;
            }
            let key = shard_key(&shard.job_id, shard.shard);
            let outcome = self
                .update::<StoredShard, Option<(bool, Option<String>)>>(&self.shards, &key, |s| {
                    let now = now_ms();
                    match s {
                        Some(mut s)
                            if s.state == ShardState::Leased && s.expires_at.is_some_and(|e| e < now) =>
                        {
                            let reply = s.ack.clone();
                            s.clear_lease();
                            let dead = s.attempts >= s.max_attempts;
                            if dead {
                                s.state = ShardState::Dead;
                                s.last_error = Some("lease expired after the last attempt".into());
                            } else {
                                s.state = ShardState::Queued;
                                s.available_at = now;
                                s.last_error = Some("lease expired".into());
                            }
                            Ok(Edit::Write(s, Some((dead, reply))))
                        }
                        _ => Ok(Edit::Keep(None)),
                    }
                })
                .await?;
            match outcome {
                Some((true, reply)) => {
                    report.dead += 1;
                    self.ack_quietly(reply.as_deref(), Signal::Term).await;
                }
                Some((false, reply)) => {
                    report.requeued += 1;
                    self.ack_quietly(reply.as_deref(), Signal::Nak(None)).await;
                }
                None => {}
            }
        }
        self.reconcile(&shards).await?;
        Ok(report)
    }

    async fn depth(&self) -> Result<u64, QueueError> {
        let shards = self.scan::<StoredShard>(&self.shards).await?;
        Ok(shards.iter().filter(|s| matches!(s.state, ShardState::Queued | ShardState::Leased)).count()
            as u64)
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
        };
        let id = uuid::Uuid::new_v4().to_string();
        if let Some(key) = idempotency {
            // Create-only: of concurrent submitters with one request id, exactly one claims it.
            let idem_key = hex::encode(Sha256::digest(key.request_id.as_bytes()));
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
        Ok(SubmitOutcome { job: job.record(), created: true })
    }

    async fn job(&self, id: &str) -> Result<Option<JobRecord>, QueueError> {
        if !valid_id(id) {
            return Ok(None);
        }
        Ok(self.read::<StoredJob>(&self.jobs, id).await?.map(|(j, _)| j.record()))
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
            shard.clear_lease();
            Signal::Ack
        })
        .await?;
        let now = now_ms();
        self.update::<StoredJob, JobRecord>(&self.jobs, &lease.job_id, |job| {
            let Some(mut job) = job else {
                return Err(QueueError::Corrupt(format!("job {} missing", lease.job_id)));
            };
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
        // queued shard's message is terminated when it is next pulled.
        let reason = format!("job {}", state.as_str());
        let retire = |shard: u64| {
            let reason = reason.clone();
            async move {
                let key = shard_key(id, shard);
                let reply = self
                    .update::<StoredShard, Option<Option<String>>>(&self.shards, &key, |s| {
                        Ok(match s {
                            Some(mut s) if matches!(s.state, ShardState::Queued | ShardState::Leased) => {
                                let reply = s.ack.clone();
                                s.state = ShardState::Dead;
                                s.last_error = Some(reason.clone());
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
            }
        };
        futures_util::stream::iter((0..job.shards_total).map(retire))
            .buffer_unordered(UPDATE_WINDOW)
            .try_collect::<()>()
            .await?;
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
                let ticket = encode(&Ticket { job_id: id.to_string(), shard: shard.index })?;
                let subject = format!("{}.{}", self.subject_prefix, priority_token(job.spec.priority));
                let message = jetstream::message::PublishMessage::build()
                    .payload(ticket)
                    .message_id(format!("{key}.retry{now}"));
                let ack = self
                    .js
                    .send_publish(subject, message)
                    .await
                    .map_err(|e| nats_err(&format!("publishing {key}"), e))?;
                ack.await.map_err(|e| nats_err(&format!("publishing {key}"), e))?;
            }
            Ok::<_, QueueError>(())
        };
        futures_util::stream::iter(Self::plan(&job).into_iter().map(revive))
            .buffer_unordered(UPDATE_WINDOW)
            .try_collect::<()>()
            .await?;
        // Shards a crash kept from being created are the reconciler's, as for any running job.
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
        for job in self.scan::<StoredJob>(&self.jobs).await? {
            match counts.iter_mut().find(|(s, _)| *s == job.state) {
                Some((_, n)) => *n += 1,
                None => counts.push((job.state, 1)),
            }
        }
        Ok(counts)
    }
}
