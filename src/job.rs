//! Jobs as the service stores them: a validated request (the seed always set, so every run of it is
//! replayable) and its progress.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::classes::ClassSpec;
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
    /// The submitter's W3C trace context (`traceparent`, `tracestate`), so that the job's spans on any
    /// worker join its trace ([`crate::telemetry`]); empty when it came without one.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub trace_context: BTreeMap<String, String>,
    /// The job whose seeds this one continues (`generate --extend`): same settings, the seeds after its.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extends: Option<String>,
    /// The job's own webhook, which gets its events besides the server's ([`crate::events`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<String>,
    /// Each sample's class and the guidance, for a class-conditional model (`None`: unconditional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classes: Option<ClassSpec>,
}

impl JobSpec {
    /// The classifier-free guidance every batch of the job runs with (`None`: unguided).
    pub fn guidance(&self) -> Option<crate::sampler::Guidance> {
        self.classes.as_ref().and_then(|c| c.guidance).map(Into::into)
    }
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

impl ShardPayload {
    /// The payload as every queue backend stores it (JSON).
    pub fn encode(&self) -> String {
        format!("{{\"start\":{},\"end\":{}}}", self.start, self.end)
    }

    /// A stored payload; `None` when it is not one.
    pub fn decode(payload: &str) -> Option<Self> {
        serde_json::from_str(payload).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_stored_before_trace_context_still_load_and_new_ones_keep_it() {
        // A spec as the SQLite and NATS stores wrote it before jobs carried a trace context.
        let old = r#"{"model":"tiny","scheduler":"ddim","steps":3,"eta":null,"num_samples":4,"seed":1,
            "batch_size":2,"samples_per_grid":4,"grid_columns":2,"output":null,"priority":0,"labels":{}}"#;
        let mut spec: JobSpec = serde_json::from_str(old).unwrap();
        assert!(spec.trace_context.is_empty());
        // Without one, nothing is written: records stay as they were.
        assert!(!serde_json::to_string(&spec).unwrap().contains("trace_context"));
        spec.trace_context
            .insert("traceparent".into(), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
        let back: JobSpec = serde_json::from_str(&serde_json::to_string(&spec).unwrap()).unwrap();
        assert_eq!(back, spec);
    }

    #[test]
    fn shard_payloads_round_trip_as_the_queues_store_them() {
        let p = ShardPayload { start: 8, end: 4096 };
        assert_eq!(p.encode(), serde_json::to_string(&p).unwrap());
        assert_eq!(ShardPayload::decode(&p.encode()), Some(p));
        assert_eq!(ShardPayload::decode("{\"shard\":1}"), None);
    }
}
