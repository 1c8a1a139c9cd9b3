//! Jobs as the service stores them: a validated request (the seed always set, so every run of it is
//! replayable) and its progress.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::dataset::DatasetOptions;
use crate::schedulers::SchedulerKind;
use crate::storage::Destination;

/// A validated job request. Built at the API boundary; everything after it can trust the values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    /// The client's idempotency key (empty when none was given).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub request_id: String,
    /// Who submitted it (a token's name; empty for jobs from a server without tokens).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub owner: String,
    /// A model name from the worker's configuration.
    pub model: String,
    pub scheduler: SchedulerKind,
    pub steps: u32,
    pub eta: Option<f32>,
    pub num_samples: u64,
    /// Sample `i` draws from a generator seeded `seed + i`.
    pub seed: u64,
    pub batch_size: u32,
    pub samples_per_grid: u32,
    pub grid_columns: u32,
    /// Where the job writes, resolved at submission (bucket or root, and prefix; the job's folder is
    /// `<prefix>/<job_id>`). `None` for jobs queued before that: the server's default destination.
    pub output: Option<Destination>,
    pub priority: i32,
    pub labels: BTreeMap<String, String>,
    /// Layout and encoding of the samples (jobs queued before formats existed get `files` of PNGs).
    #[serde(default)]
    pub dataset: DatasetOptions,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed | JobState::Cancelled)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [JobState::Queued, JobState::Running, JobState::Succeeded, JobState::Failed, JobState::Cancelled]
            .into_iter()
            .find(|state| state.as_str() == s)
    }
}

/// A job and its progress, as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    pub id: String,
    pub spec: JobSpec,
    pub state: JobState,
    pub samples_done: u64,
    pub shards_done: u64,
    pub shards_total: u64,
    pub created_at_ms: i64,
    pub started_at_ms: Option<i64>,
    pub finished_at_ms: Option<i64>,
    pub error: Option<String>,
    pub manifest_uri: Option<String>,
}

/// The sample range of one shard task (its queue payload).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardPayload {
    pub start: u64,
    pub end: u64,
}
