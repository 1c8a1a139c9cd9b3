//! The `ddpm.v1.Worker` gRPC service: request checks, conversions between the wire types and the
//! job model, and the five RPCs.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::error::{FieldViolation, ServiceError};
use crate::api::pb;
use crate::job::{JobRecord, JobSpec, JobState, OutputSpec};
use crate::queue::{IdempotencyKey, JobFilter, PageCursor};
use crate::schedulers::{SchedulerError, SchedulerKind};
use crate::storage::check_key;
use crate::worker::WorkerContext;
use crate::worker::outputs;

/// Limits on what one request may ask for.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_samples: u64,
    pub max_steps: u32,
    pub max_batch_size: u32,
    pub default_batch_size: u32,
    pub max_samples_per_grid: u32,
    pub batches_per_shard: u64,
    /// Shards of one job at most: a larger job gets longer shards, so queueing it stays cheap.
    pub max_shards_per_job: u64,
    pub max_attempts: u32,
}

impl Limits {
    /// Batches per shard for `spec`: the configured number, or more where that would make more than
    /// `max_shards_per_job` shards. Shard boundaries do not change the images (see `queue::plan`).
    pub fn batches_per_shard(&self, spec: &JobSpec) -> u64 {
        let batches = spec.num_samples.div_ceil(u64::from(spec.batch_size.max(1)));
        self.batches_per_shard.max(batches.div_ceil(self.max_shards_per_job.max(1)))
    }
}

/// Job priorities accepted (each distinct value is a consumer on a NATS queue, so the range is small).
pub const PRIORITIES: std::ops::RangeInclusive<i32> = -10..=10;
/// Longest client value echoed back in an error: error messages travel in trailers (8 KiB at most).
const ECHO_LIMIT: usize = 64;

/// `value` for an error message: quoted, and cut to [`ECHO_LIMIT`] characters.
fn shown(value: &str) -> String {
    if value.chars().count() <= ECHO_LIMIT {
        return format!("{value:?}");
    }
    let head: String = value.chars().take(ECHO_LIMIT).collect();
    format!("{head:?}… ({} bytes)", value.len())
}

/// S3's bucket naming rules (general purpose buckets): 3–63 characters of lowercase letters, digits,
/// '.' and '-', starting and ending with a letter or digit, no "..", not an IP address, and none of
/// the reserved prefixes and suffixes.
pub fn check_bucket(name: &str) -> Result<(), String> {
    let chars_ok =
        name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
    let ends_ok = name.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && name.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric());
    if !(3..=63).contains(&name.len()) || !chars_ok || !ends_ok {
        return Err(
            "3 to 63 lowercase letters, digits, '.' and '-', starting and ending with a letter or digit"
                .into(),
        );
    }
    if name.contains("..") || name.parse::<std::net::Ipv4Addr>().is_ok() {
        return Err("no \"..\" and not an IP address".into());
    }
    let reserved = ["xn--", "sthree-", "amzn-s3-demo-"].iter().any(|p| name.starts_with(p))
        || ["-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3"].iter().any(|s| name.ends_with(s));
    if reserved {
        return Err("uses a prefix or suffix S3 reserves".into());
    }
    Ok(())
}

/// An output prefix: a relative path of at most 1,024 bytes whose segments are 1–255 bytes, without
/// '.' or '..' segments, backslashes, NUL or other control characters.
pub fn check_prefix(prefix: &str) -> Result<(), String> {
    if prefix.len() > 1024 {
        return Err(format!("{} bytes; at most 1024", prefix.len()));
    }
    if prefix.chars().any(|c| c.is_control() || c == '\\') {
        return Err("no control characters or backslashes".into());
    }
    if prefix.split('/').any(|seg| seg.len() > 255) {
        return Err("a path segment is longer than 255 bytes".into());
    }
    if prefix.split('/').next() == Some(crate::storage::local::STAGING_DIR) {
        return Err(format!("{} is reserved", crate::storage::local::STAGING_DIR));
    }
    check_key(prefix).map_err(|_| "not a relative path without empty, '.' or '..' segments".into())
}

/// Grids shown on a job, at most: the manifest lists them all.
const MAX_GRID_URIS: u64 = 64;
const MAX_PAGE_SIZE: u32 = 1000;
const DEFAULT_PAGE_SIZE: u32 = 100;
const WATCH_POLL: Duration = Duration::from_millis(200);

pub struct WorkerService {
    pub ctx: Arc<WorkerContext>,
    pub limits: Limits,
}

impl WorkerService {
    /// Checks a submission and resolves its defaults (seed, batch size, grid), naming every bad field.
    pub fn validate(&self, req: &pb::SubmitJobRequest) -> Result<JobSpec, ServiceError> {
        let mut bad = Vec::new();
        let mut violation =
            |field: &str, description: String| bad.push(FieldViolation { field: field.into(), description });
        let limits = &self.limits;
        if req.request_id.len() > 128 {
            violation("request_id", "at most 128 bytes".into());
        }
        let model = self.ctx.models.get(&req.model);
        if req.model.is_empty() {
            violation("model", "required".into());
        } else if model.is_none() {
            let served: Vec<&str> = self.ctx.models.keys().map(String::as_str).collect();
            violation(
                "model",
                format!("unknown model {}; this worker serves {}", shown(&req.model), served.join(", ")),
            );
        }
        let sampling = req.sampling.unwrap_or_default();
        let scheduler = match pb::Scheduler::try_from(sampling.scheduler) {
            Ok(pb::Scheduler::Ddpm) => Some(SchedulerKind::Ddpm),
            Ok(pb::Scheduler::Ddim) => Some(SchedulerKind::Ddim),
            Ok(pb::Scheduler::Pndm) => Some(SchedulerKind::Pndm),
            Ok(pb::Scheduler::Dpmsolver) => Some(SchedulerKind::Dpmsolver),
            Ok(pb::Scheduler::Unspecified) => {
                violation("sampling.scheduler", "required (DDPM, DDIM, PNDM or DPMSOLVER)".into());
                None
            }
            Err(_) => {
                violation("sampling.scheduler", format!("unknown scheduler {}", sampling.scheduler));
                None
            }
        };
        if sampling.steps == 0 || sampling.steps > limits.max_steps {
            violation("sampling.steps", format!("{} must be in 1..={}", sampling.steps, limits.max_steps));
        }
        if let Some(eta) = sampling.eta {
            if scheduler.is_some_and(|s| s != SchedulerKind::Ddim) {
                violation("sampling.eta", "applies to the DDIM scheduler only".into());
            } else if !(eta.is_finite() && eta >= 0.0) {
                violation("sampling.eta", format!("{eta} must be a finite number ≥ 0"));
            }
        }
        // The model's own scheduler config decides which step counts work (e.g. DDPM ≤ its training steps).
        if let (Some(model), Some(kind)) = (model, scheduler)
            && (1..=limits.max_steps).contains(&sampling.steps)
        {
            match model
                .scheduler(kind)
                .and_then(|s| s.build(sampling.steps as usize, sampling.eta.unwrap_or(0.0)))
            {
                Ok(_) => {}
                Err(SchedulerError::Steps { max, .. }) => violation(
                    "sampling.steps",
                    format!("{} must be in 1..={max} for this model", sampling.steps),
                ),
                Err(e) => violation("sampling.scheduler", e.to_string()),
            }
        }
        if req.num_samples == 0 || req.num_samples > limits.max_samples {
            violation("num_samples", format!("{} must be in 1..={}", req.num_samples, limits.max_samples));
        }
        // A server-chosen seed stays below 2^53 so it survives JSON tooling exactly.
        let seed = req.seed.unwrap_or_else(|| uuid::Uuid::new_v4().as_u64_pair().0 >> 11);
        if seed.checked_add(req.num_samples.saturating_sub(1)).is_none() {
            violation("seed", "seed + num_samples overflows u64".into());
        }
        let batch_size = match req.batch_size {
            0 => limits.default_batch_size.min(req.num_samples.clamp(1, u64::from(u32::MAX)) as u32),
            b if b > limits.max_batch_size => {
                violation("batch_size", format!("{b} exceeds the limit of {}", limits.max_batch_size));
                1
            }
            b => b,
        };
        let (samples_per_grid, grid_columns) = match &req.grid {
            None => {
                let n = req.num_samples.min(64) as u32;
                (n, crate::imaging::grid_columns(n as usize) as u32)
            }
            Some(g) if g.samples_per_grid > limits.max_samples_per_grid => {
                violation(
                    "grid.samples_per_grid",
                    format!("{} exceeds the limit of {}", g.samples_per_grid, limits.max_samples_per_grid),
                );
                (0, 0)
            }
            Some(g) if g.samples_per_grid > 0 && g.columns > g.samples_per_grid => {
                violation("grid.columns", format!("{} is more than samples_per_grid", g.columns));
                (0, 0)
            }
            Some(g) => {
                let cols = if g.columns == 0 {
                    crate::imaging::grid_columns(g.samples_per_grid as usize) as u32
                } else {
                    g.columns
                };
                (g.samples_per_grid, cols)
            }
        };
        let output = match &req.output {
            Some(o) if !o.bucket.is_empty() || !o.prefix.is_empty() => {
                if !o.bucket.is_empty() && !self.ctx.outputs.accepts_buckets() {
                    violation(
                        "output.bucket",
                        "this worker writes to a local directory; leave the bucket empty".into(),
                    );
                } else if !o.bucket.is_empty()
                    && let Err(e) = check_bucket(&o.bucket)
                {
                    violation("output.bucket", format!("{}: {e}", shown(&o.bucket)));
                }
                if !o.prefix.is_empty()
                    && let Err(e) = check_prefix(o.prefix.trim_end_matches('/'))
                {
                    violation("output.prefix", format!("{}: {e}", shown(&o.prefix)));
                }
                Some(OutputSpec {
                    bucket: o.bucket.clone(),
                    prefix: o.prefix.trim_end_matches('/').to_string(),
                })
            }
            _ => None,
        };
        if req.labels.len() > 64 {
            violation("labels", "at most 64 labels".into());
        }
        for (k, v) in &req.labels {
            let key_ok = !k.is_empty()
                && k.len() <= 63
                && k.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
            if !key_ok {
                violation(
                    "labels",
                    format!("key {}: 1 to 63 of letters, digits, '-', '_', '.', '/'", shown(k)),
                );
            }
            if v.len() > 256 {
                violation("labels", format!("value of {}: at most 256 bytes", shown(k)));
            }
        }
        if !PRIORITIES.contains(&req.priority) {
            violation(
                "priority",
                format!("{} must be in {}..={}", req.priority, PRIORITIES.start(), PRIORITIES.end()),
            );
        }
        if !bad.is_empty() {
            return Err(ServiceError::InvalidArgument(bad));
        }
        Ok(JobSpec {
            request_id: req.request_id.clone(),
            model: req.model.clone(),
            scheduler: scheduler.unwrap_or(SchedulerKind::Ddpm),
            steps: sampling.steps,
            eta: sampling.eta,
            num_samples: req.num_samples,
            seed,
            batch_size,
            samples_per_grid,
            grid_columns,
            output,
            priority: req.priority,
            labels: req.labels.clone().into_iter().collect(),
        })
    }

    async fn to_pb(&self, job: &JobRecord) -> pb::Job {
        let spec = &job.spec;
        let mut grid_uris = Vec::new();
        if job.state == JobState::Succeeded
            && let Ok(out) = self.ctx.outputs.for_job(&job.id, spec).await
        {
            grid_uris = outputs::grid_ranges(spec)
                .take(MAX_GRID_URIS as usize)
                .map(|g| out.uri(&out.grid_key(g.0)))
                .collect();
        }
        pb::Job {
            job_id: job.id.clone(),
            request: Some(request_of(spec)),
            seed: spec.seed,
            batch_size: spec.batch_size,
            state: state_to_pb(job.state) as i32,
            samples_done: job.samples_done,
            samples_total: spec.num_samples,
            shards_done: job.shards_done as u32,
            shards_total: job.shards_total as u32,
            created_at: Some(timestamp(job.created_at_ms)),
            started_at: job.started_at_ms.map(timestamp),
            finished_at: job.finished_at_ms.map(timestamp),
            error: job.error.clone().unwrap_or_default(),
            manifest_uri: job.manifest_uri.clone().unwrap_or_default(),
            grid_uris,
        }
    }

    async fn get(&self, job_id: &str) -> Result<JobRecord, ServiceError> {
        if job_id.is_empty() {
            return Err(ServiceError::invalid("job_id", "required"));
        }
        if job_id.len() > 128 {
            return Err(ServiceError::invalid("job_id", format!("{}: at most 128 bytes", shown(job_id))));
        }
        self.ctx.queue.job(job_id).await?.ok_or_else(|| ServiceError::NotFound(job_id.to_string()))
    }
}

/// The request a job was made from, with its resolved defaults.
fn request_of(spec: &JobSpec) -> pb::SubmitJobRequest {
    let scheduler = match spec.scheduler {
        SchedulerKind::Ddpm => pb::Scheduler::Ddpm,
        SchedulerKind::Ddim => pb::Scheduler::Ddim,
        SchedulerKind::Pndm => pb::Scheduler::Pndm,
        SchedulerKind::Dpmsolver => pb::Scheduler::Dpmsolver,
    };
    pb::SubmitJobRequest {
        request_id: spec.request_id.clone(),
        model: spec.model.clone(),
        sampling: Some(pb::SamplingSpec { scheduler: scheduler as i32, steps: spec.steps, eta: spec.eta }),
        num_samples: spec.num_samples,
        seed: Some(spec.seed),
        batch_size: spec.batch_size,
        grid: Some(pb::GridSpec { samples_per_grid: spec.samples_per_grid, columns: spec.grid_columns }),
        output: spec
            .output
            .as_ref()
            .map(|o| pb::OutputSpec { bucket: o.bucket.clone(), prefix: o.prefix.clone() }),
        priority: spec.priority,
        labels: spec.labels.clone().into_iter().collect(),
    }
}

fn state_to_pb(s: JobState) -> pb::JobState {
    match s {
        JobState::Queued => pb::JobState::Queued,
        JobState::Running => pb::JobState::Running,
        JobState::Succeeded => pb::JobState::Succeeded,
        JobState::Failed => pb::JobState::Failed,
        JobState::Cancelled => pb::JobState::Cancelled,
    }
}

fn state_from_pb(s: i32) -> Option<JobState> {
    match pb::JobState::try_from(s).ok()? {
        pb::JobState::Unspecified => None,
        pb::JobState::Queued => Some(JobState::Queued),
        pb::JobState::Running => Some(JobState::Running),
        pb::JobState::Succeeded => Some(JobState::Succeeded),
        pb::JobState::Failed => Some(JobState::Failed),
        pb::JobState::Cancelled => Some(JobState::Cancelled),
    }
}

fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: ms.div_euclid(1000), nanos: (ms.rem_euclid(1000) * 1_000_000) as i32 }
}

/// Page tokens are the last job's `(created_at, id)`, hex-encoded so clients treat them as opaque.
fn encode_cursor(job: &JobRecord) -> String {
    hex::encode(format!("{}:{}", job.created_at_ms, job.id))
}

fn decode_cursor(token: &str) -> Option<PageCursor> {
    let text = String::from_utf8(hex::decode(token).ok()?).ok()?;
    let (ms, id) = text.split_once(':')?;
    Some(PageCursor { created_at_ms: ms.parse().ok()?, id: id.to_string() })
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::JobEvent, Status>> + Send>>;

#[tonic::async_trait]
impl pb::worker_server::Worker for WorkerService {
    async fn submit_job(
        &self,
        request: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::SubmitJobResponse>, Status> {
        let started = std::time::Instant::now();
        let req = request.into_inner();
        if self.ctx.draining.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(ServiceError::ShuttingDown.into());
        }
        let spec = self.validate(&req).inspect_err(|_| {
            metrics::counter!("ddpm_jobs_submitted_total", "result" => "invalid").increment(1);
        })?;
        // The request as the client sent it (before defaults), so a retry of a seedless request matches.
        let key = (!req.request_id.is_empty()).then(|| {
            let mut sent = req.clone();
            sent.request_id.clear();
            IdempotencyKey {
                request_id: req.request_id.clone(),
                request_hash: crate::digest::sha256_hex(&sent.encode_to_vec()),
            }
        });
        let outcome = self
            .ctx
            .queue
            .submit(&spec, key.as_ref(), self.limits.batches_per_shard(&spec), self.limits.max_attempts)
            .await
            .map_err(ServiceError::from)?;
        let result = if outcome.created { "created" } else { "existing" };
        metrics::counter!("ddpm_jobs_submitted_total", "result" => result).increment(1);
        metrics::histogram!("ddpm_submit_duration_seconds").record(started.elapsed().as_secs_f64());
        if outcome.created {
            tracing::info!(
                job_id = outcome.job.id,
                model = spec.model,
                num_samples = spec.num_samples,
                shards = outcome.job.shards_total,
                "job queued"
            );
            self.ctx.wake.notify_waiters();
        }
        Ok(Response::new(pb::SubmitJobResponse { job: Some(self.to_pb(&outcome.job).await) }))
    }

    async fn get_job(&self, request: Request<pb::GetJobRequest>) -> Result<Response<pb::Job>, Status> {
        let job = self.get(&request.into_inner().job_id).await?;
        Ok(Response::new(self.to_pb(&job).await))
    }

    async fn list_jobs(
        &self,
        request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let req = request.into_inner();
        let mut states = Vec::new();
        for s in &req.states {
            states.push(
                state_from_pb(*s)
                    .ok_or_else(|| ServiceError::invalid("states", format!("unknown state {s}")))?,
            );
        }
        if req.page_size > MAX_PAGE_SIZE {
            return Err(ServiceError::invalid("page_size", format!("at most {MAX_PAGE_SIZE}")).into());
        }
        let limit = if req.page_size == 0 { DEFAULT_PAGE_SIZE } else { req.page_size } as usize;
        let cursor = match req.page_token.as_str() {
            "" => None,
            token => Some(
                decode_cursor(token)
                    .ok_or_else(|| ServiceError::invalid("page_token", "not a token from ListJobs"))?,
            ),
        };
        let filter = JobFilter { states, labels: req.labels.into_iter().collect::<BTreeMap<_, _>>() };
        // One extra row tells whether another page follows.
        let mut jobs = self
            .ctx
            .queue
            .list_jobs(&filter, cursor.as_ref(), limit + 1)
            .await
            .map_err(ServiceError::from)?;
        let more = jobs.len() > limit;
        jobs.truncate(limit);
        let next_page_token =
            if more { jobs.last().map(encode_cursor).unwrap_or_default() } else { String::new() };
        let mut out = Vec::with_capacity(jobs.len());
        for job in &jobs {
            out.push(self.to_pb(job).await);
        }
        Ok(Response::new(pb::ListJobsResponse { jobs: out, next_page_token }))
    }

    async fn cancel_job(&self, request: Request<pb::CancelJobRequest>) -> Result<Response<pb::Job>, Status> {
        let job = self.get(&request.into_inner().job_id).await?;
        let job = match job.state {
            JobState::Succeeded | JobState::Failed => {
                return Err(
                    ServiceError::AlreadyFinished { job_id: job.id, state: job.state.as_str() }.into()
                );
            }
            JobState::Cancelled => job,
            JobState::Queued | JobState::Running => {
                let finished = self
                    .ctx
                    .queue
                    .finish_job(&job.id, JobState::Cancelled, Some("cancelled by request"), None)
                    .await
                    .map_err(ServiceError::from)?;
                self.ctx.active.stop_job(&job.id);
                let job = finished.ok_or_else(|| ServiceError::NotFound(job.id.clone()))?;
                if job.state == JobState::Cancelled {
                    metrics::counter!("ddpm_jobs_finished_total", "state" => "cancelled").increment(1);
                    tracing::info!(job_id = job.id, "job cancelled");
                }
                job
            }
        };
        Ok(Response::new(self.to_pb(&job).await))
    }

    async fn retry_job(&self, request: Request<pb::RetryJobRequest>) -> Result<Response<pb::Job>, Status> {
        let job = self.get(&request.into_inner().job_id).await?;
        if job.state != JobState::Failed {
            return Err(ServiceError::NotFailed { job_id: job.id, state: job.state.as_str() }.into());
        }
        let job = self
            .ctx
            .queue
            .retry_job(&job.id)
            .await
            .map_err(ServiceError::from)?
            .ok_or_else(|| ServiceError::NotFound(job.id.clone()))?;
        if job.state == JobState::Failed {
            // Another caller's retry raced this one and the job failed again in between: say so.
            return Err(ServiceError::NotFailed { job_id: job.id, state: "failed again" }.into());
        }
        tracing::info!(job_id = job.id, "job retried");
        self.ctx.wake.notify_waiters();
        Ok(Response::new(self.to_pb(&job).await))
    }

    type WatchJobStream = WatchStream;

    async fn watch_job(
        &self,
        request: Request<pb::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let first = self.get(&request.into_inner().job_id).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let ctx = Arc::clone(&self.ctx);
        let service = WorkerService { ctx: Arc::clone(&self.ctx), limits: self.limits.clone() };
        tokio::spawn(async move {
            let mut last = first;
            if tx.send(Ok(pb::JobEvent { job: Some(service.to_pb(&last).await) })).await.is_err() {
                return;
            }
            while !last.state.is_terminal() {
                tokio::time::sleep(WATCH_POLL).await;
                // An open stream would hold the server's graceful shutdown until the job ends: end it,
                // and the client watches again on another worker (or after the restart).
                if ctx.draining.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = tx.send(Err(ServiceError::ShuttingDown.into())).await;
                    break;
                }
                let job = match ctx.queue.job(&last.id).await {
                    Ok(Some(job)) => job,
                    Ok(None) => break,
                    Err(e) => {
                        let _ = tx.send(Err(Status::from(ServiceError::from(e)))).await;
                        break;
                    }
                };
                if job != last {
                    if tx.send(Ok(pb::JobEvent { job: Some(service.to_pb(&job).await) })).await.is_err() {
                        return; // the client went away
                    }
                    last = job;
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_reject_garbage() {
        let job = JobRecord {
            id: "abc-1".into(),
            spec: crate::queue::conformance::spec(1, 1, 0, &[]),
            state: JobState::Queued,
            samples_done: 0,
            shards_done: 0,
            shards_total: 1,
            created_at_ms: 1234,
            started_at_ms: None,
            finished_at_ms: None,
            error: None,
            manifest_uri: None,
        };
        assert_eq!(
            decode_cursor(&encode_cursor(&job)),
            Some(PageCursor { created_at_ms: 1234, id: "abc-1".into() })
        );
        assert_eq!(decode_cursor("zz"), None);
        assert_eq!(decode_cursor(&hex::encode("nocolon")), None);
    }

    #[test]
    fn timestamps_split_milliseconds() {
        assert_eq!(timestamp(1_500), prost_types::Timestamp { seconds: 1, nanos: 500_000_000 });
        assert_eq!(timestamp(-1), prost_types::Timestamp { seconds: -1, nanos: 999_000_000 });
    }
}
