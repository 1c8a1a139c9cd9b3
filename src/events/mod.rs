//! Job events: each change of a job's state (queued, running, succeeded, failed, cancelled, deleted) as a
//! CloudEvent in structured JSON. The queue records an event with the change it reports (SQLite: an
//! outbox row in the same transaction; NATS: a message on `ddpm.<namespace>.events.job.<kind>` in the
//! namespace's events stream, republished by the reconciler after a crash between the two), and the
//! [`dispatch`] loop delivers it to the webhooks, signed ([`webhook`]), retried with backoff, at least
//! once per webhook; receivers drop repeats by the event's `id`.

pub mod dispatch;
pub mod webhook;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::job::{JobRecord, JobState};

/// The CloudEvents `type` of every event starts with this, then the kind: `dev.ddpm.job.succeeded`.
pub const TYPE_PREFIX: &str = "dev.ddpm.job.";

/// What happened to a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    Deleted,
}

impl EventKind {
    /// The event of a job entering `state`.
    pub fn entering(state: JobState) -> Self {
        match state {
            JobState::Queued => EventKind::Queued,
            JobState::Running => EventKind::Running,
            JobState::Succeeded => EventKind::Succeeded,
            JobState::Failed => EventKind::Failed,
            JobState::Cancelled => EventKind::Cancelled,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Queued => "queued",
            EventKind::Running => "running",
            EventKind::Succeeded => "succeeded",
            EventKind::Failed => "failed",
            EventKind::Cancelled => "cancelled",
            EventKind::Deleted => "deleted",
        }
    }
}

/// A recorded event: its id (`<job id>.<n>`, the job's n-th event: stable across redeliveries), the
/// job's own webhook if it named one, and the CloudEvent as delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobEvent {
    pub id: String,
    pub job_id: String,
    pub kind: EventKind,
    pub webhook: Option<String>,
    /// The CloudEvent, structured JSON (`application/cloudevents+json`).
    pub body: String,
}

impl JobEvent {
    /// The `number`-th event of `job`, of `kind`, at `now_ms`; `source` names the queue (the CloudEvents
    /// `source` is `/ddpm-worker/<source>`).
    pub fn new(job: &JobRecord, kind: EventKind, number: u64, source: &str, now_ms: i64) -> Self {
        let id = format!("{}.{number}", job.id);
        let body = json!({
            "specversion": "1.0",
            "id": id,
            "source": format!("/ddpm-worker/{source}"),
            "type": format!("{TYPE_PREFIX}{}", kind.as_str()),
            "subject": job.id,
            "time": rfc3339(now_ms),
            "datacontenttype": "application/json",
            "data": data(job, kind),
        });
        JobEvent {
            id,
            job_id: job.id.clone(),
            kind,
            webhook: job.spec.webhook.clone(),
            body: body.to_string(),
        }
    }
}

/// The event's `data`: the job as it is after the change, with the API's names (`ddpm.v1.Job` in the
/// protobuf JSON mapping, without its spec's sampling settings).
fn data(job: &JobRecord, kind: EventKind) -> serde_json::Value {
    let state = match kind {
        EventKind::Deleted => "JOB_STATE_DELETED".to_string(),
        _ => format!("JOB_STATE_{}", job.state.as_str().to_uppercase()),
    };
    let mut data = json!({
        "jobId": job.id,
        "state": state,
        "owner": job.spec.owner,
        "model": job.spec.model,
        "labels": job.spec.labels,
        "samplesDone": job.samples_done.to_string(),
        "samplesTotal": job.spec.num_samples.to_string(),
        "shardsDone": job.shards_done,
        "shardsTotal": job.shards_total,
        "createTime": rfc3339(job.created_at_ms),
    });
    let optional = [
        ("requestId", (!job.spec.request_id.is_empty()).then(|| job.spec.request_id.clone())),
        ("startTime", job.started_at_ms.map(rfc3339)),
        ("finishTime", job.finished_at_ms.map(rfc3339)),
        ("manifestUri", job.manifest_uri.clone()),
        ("error", job.error.clone()),
        ("extends", job.spec.extends.clone()),
    ];
    for (key, value) in optional {
        if let Some(value) = value {
            data[key] = value.into();
        }
    }
    data
}

/// Milliseconds since the epoch as RFC 3339 UTC (`2026-12-07T03:04:05.678Z`).
fn rfc3339(ms: i64) -> String {
    let time = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    time.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_is_a_cloud_event_with_the_job_as_data() {
        let mut spec = crate::queue::conformance::spec(10, 2, 0, &[("team", "a")]);
        spec.webhook = Some("https://hooks.example.com/ddpm".into());
        let job = JobRecord {
            id: "job-1".into(),
            spec,
            state: JobState::Succeeded,
            samples_done: 10,
            shards_done: 5,
            shards_total: 5,
            created_at_ms: 1_700_000_000_000,
            started_at_ms: Some(1_700_000_001_000),
            finished_at_ms: Some(1_700_000_002_500),
            error: None,
            manifest_uri: Some("file:///out/job-1/manifest.json".into()),
        };
        let event = JobEvent::new(&job, EventKind::Succeeded, 3, "sqlite", 1_700_000_002_500);
        assert_eq!((event.id.as_str(), event.kind), ("job-1.3", EventKind::Succeeded));
        assert_eq!(event.webhook.as_deref(), Some("https://hooks.example.com/ddpm"));
        let body: serde_json::Value = serde_json::from_str(&event.body).unwrap();
        assert_eq!(body["specversion"], "1.0");
        assert_eq!(body["id"], "job-1.3");
        assert_eq!(body["type"], "dev.ddpm.job.succeeded");
        assert_eq!(body["source"], "/ddpm-worker/sqlite");
        assert_eq!(body["subject"], "job-1");
        assert_eq!(body["time"], "2023-11-14T22:13:22.5Z");
        let data = &body["data"];
        assert_eq!(data["state"], "JOB_STATE_SUCCEEDED");
        assert_eq!(data["samplesDone"], "10");
        assert_eq!(data["labels"]["team"], "a");
        assert_eq!(data["manifestUri"], "file:///out/job-1/manifest.json");
        assert!(data.get("error").is_none() && data.get("requestId").is_none());
        let deleted = JobEvent::new(&job, EventKind::Deleted, 4, "sqlite", 0);
        let body: serde_json::Value = serde_json::from_str(&deleted.body).unwrap();
        assert_eq!(body["data"]["state"], "JOB_STATE_DELETED");
    }
}
