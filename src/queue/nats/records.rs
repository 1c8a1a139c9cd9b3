//! What the NATS queue stores: job, shard and idempotency records (JSON values in KV buckets), the
//! task message body, and the keys and subject tokens they live under.

use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::corrupt;
use crate::job::{JobRecord, JobSpec, JobState};
use crate::queue::{Lease, QueueError, TaskState};

/// A job as stored in the jobs bucket.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct StoredJob {
    pub(super) id: String,
    pub(super) spec: JobSpec,
    pub(super) state: JobState,
    pub(super) samples_done: u64,
    pub(super) shards_done: u64,
    pub(super) shards_total: u64,
    pub(super) created_at: i64,
    pub(super) started_at: Option<i64>,
    pub(super) finished_at: Option<i64>,
    pub(super) updated_at: i64,
    pub(super) error: Option<String>,
    pub(super) manifest_uri: Option<String>,
    /// Kept so that a roll-forward rebuilds exactly the shards the first submitter planned.
    pub(super) batches_per_shard: u64,
    pub(super) max_attempts: u32,
    /// The shards `samples_done` and `shards_done` include.
    #[serde(default)]
    pub(super) counted: ShardSet,
    /// The idempotency key (in the idem bucket) its request id claimed, freed when the job is deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) request_key: Option<String>,
    /// Events the job has had (the last one's number) and the kind of the last announced
    /// ([`super::events`]).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub(super) events: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) announced: Option<crate::events::EventKind>,
    /// When the job was deleted: hidden from then on, its record removed once its cleanup is done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) deleted_at: Option<i64>,
    /// A deleted job's outputs stay (retention that keeps datasets).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(super) keep_outputs: bool,
    /// A cancelled job's partial outputs were deleted.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(super) outputs_removed: bool,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A set of shard indices, one bit each (hex in JSON: 2 KB for 15,000 shards). Counting a completion
/// into a job is "insert, and add only if new", so `complete_shard` and the reconciler can never both
/// count one shard.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct ShardSet(Vec<u8>);

impl ShardSet {
    pub(super) fn contains(&self, shard: u64) -> bool {
        self.0.get((shard / 8) as usize).is_some_and(|b| b & (1 << (shard % 8)) != 0)
    }

    /// Adds `shard`; `false` when it was already there.
    pub(super) fn insert(&mut self, shard: u64) -> bool {
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
    pub(super) fn record(&self) -> JobRecord {
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
pub(super) enum ShardState {
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
pub(super) struct StoredShard {
    pub(super) job_id: String,
    pub(super) shard: u64,
    pub(super) priority: i32,
    pub(super) payload: String,
    pub(super) state: ShardState,
    /// Leases taken and not given back (`release` gives one back).
    pub(super) attempts: u32,
    pub(super) max_attempts: u32,
    pub(super) available_at: i64,
    pub(super) owner: Option<String>,
    pub(super) expires_at: Option<i64>,
    /// The ack subject of the delivery the current lease holds.
    pub(super) ack: Option<String>,
    /// The stream sequence of the task's message: the lease's `task_id`.
    pub(super) seq: Option<u64>,
    pub(super) last_error: Option<String>,
    pub(super) samples: Option<u64>,
    /// The lease owner (`worker/device`) that completed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) done_by: Option<String>,
    /// Dead because its job ended, not dead-lettered on its own account.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(super) retired: bool,
}

impl StoredShard {
    /// The lease-expiry rule, written once: a leased shard whose expiry has passed (or was never
    /// recorded) may be taken over (by the reaper, or by `lease` on a redelivery); until then only its
    /// holder writes to it.
    pub(super) fn lease_expired(&self, now: i64) -> bool {
        self.state == ShardState::Leased && self.expires_at.is_none_or(|e| e < now)
    }

    pub(super) fn held_by(&self, lease: &Lease, now: i64) -> bool {
        self.state == ShardState::Leased
            && self.owner.as_deref() == Some(lease.owner.as_str())
            && self.attempts == lease.attempt
            && !self.lease_expired(now)
    }

    pub(super) fn clear_lease(&mut self) {
        self.owner = None;
        self.expires_at = None;
        self.ack = None;
    }
}

/// An idempotency record: which job a request id made, and the request's hash.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct StoredKey {
    pub(super) request_id: String,
    pub(super) request_hash: String,
    pub(super) job_id: String,
}

/// The body of a task message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Ticket {
    pub(super) job_id: String,
    pub(super) shard: u64,
}

/// A priority as a subject token whose byte order is the numeric order (sign bit flipped, hex).
pub(super) fn priority_token(priority: i32) -> String {
    format!("{:08x}", (priority as u32) ^ 0x8000_0000)
}

pub(super) fn shard_key(job_id: &str, shard: u64) -> String {
    format!("{job_id}.{shard}")
}

/// KV keys and job ids we accept: what a uuid needs, no subject wildcards or separators.
pub(super) fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

pub(super) fn ms_duration(ms: i64) -> Duration {
    Duration::from_millis(ms.max(0) as u64)
}

pub(super) fn encode<T: Serialize>(value: &T) -> Result<Bytes, QueueError> {
    serde_json::to_vec(value).map(Bytes::from).map_err(|e| corrupt("encoding a record", e))
}

pub(super) fn decode<T: for<'de> Deserialize<'de>>(what: &str, bytes: &[u8]) -> Result<T, QueueError> {
    serde_json::from_slice(bytes).map_err(|e| corrupt(what, e))
}
