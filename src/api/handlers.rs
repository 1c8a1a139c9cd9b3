//! The `ddpm.v1.WorkerService` handlers: thin, each checks the caller's role ([`auth`]), converts its
//! request at the boundary ([`convert`]), asks the worker (its queue, its outputs) and converts the
//! answer back; errors become statuses in one place ([`ServiceError`]).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::auth::{ANONYMOUS, Caller, Role};
use super::convert::{self, Catalog, Limits};
use super::error::ServiceError;
use super::pb;
use crate::job::{JobRecord, JobSpec, JobState};
use crate::queue::{IdempotencyKey, JobFilter};
use crate::worker::WorkerContext;
use crate::worker::outputs;

/// Grids shown on a job, at most: the manifest lists them all.
const MAX_GRID_URIS: u64 = 64;
const MAX_PAGE_SIZE: u32 = 1000;
const DEFAULT_PAGE_SIZE: u32 = 100;
const WATCH_POLL: Duration = Duration::from_millis(200);

#[derive(Clone)]
pub struct WorkerService {
    pub ctx: Arc<WorkerContext>,
    pub limits: Limits,
    /// Whether requests must carry a caller (put there by the token interceptor): a request without
    /// one is then refused rather than taken as anonymous.
    pub authenticated: bool,
}

impl WorkerService {
    /// Checks a submission against this worker's models and allowed destinations.
    pub fn validate(&self, req: &pb::SubmitJobRequest, caller: &Caller) -> Result<JobSpec, ServiceError> {
        let catalog = Catalog { models: &self.ctx.models, outputs: &self.ctx.outputs };
        convert::job_spec(req, &self.limits, &catalog, &caller.name)
    }

    /// The caller of `request`, if it has `role`.
    fn caller<T>(&self, request: &Request<T>, role: Role) -> Result<Caller, ServiceError> {
        let caller = match request.extensions().get::<Caller>() {
            Some(caller) => caller.clone(),
            None if self.authenticated => {
                return Err(ServiceError::Unauthenticated("no credentials".into()));
            }
            None => Caller::anonymous(),
        };
        caller.require(role)?;
        Ok(caller)
    }

    pub(crate) async fn to_pb(&self, job: &JobRecord) -> pb::Job {
        let mut grid_uris = Vec::new();
        if job.state == JobState::Succeeded
            && let Ok(out) = self.ctx.outputs.for_job(&job.id, &job.spec).await
        {
            grid_uris = outputs::grid_ranges(&job.spec)
                .take(MAX_GRID_URIS as usize)
                .map(|g| out.uri(&out.grid_key(g.number)))
                .collect();
        }
        convert::job_to_pb(job, grid_uris)
    }

    /// `req` as it is checked: for a request that extends a job, with that job's settings
    /// ([`convert::extension`]).
    async fn extended<'r>(
        &self,
        req: &'r pb::SubmitJobRequest,
    ) -> Result<Cow<'r, pb::SubmitJobRequest>, ServiceError> {
        let Some(spec) = req.spec.as_ref().filter(|s| !s.extends.is_empty()) else {
            return Ok(Cow::Borrowed(req));
        };
        let id = convert::name_in("spec.extends", &spec.extends)?;
        let base = self
            .ctx
            .queue
            .job(id)
            .await?
            .ok_or_else(|| ServiceError::invalid("spec.extends", format!("no job {id:?}")))?;
        let spec = convert::extension(spec, &base)?;
        Ok(Cow::Owned(pb::SubmitJobRequest { request_id: req.request_id.clone(), spec: Some(spec) }))
    }

    /// What each warmed-up device fits of each model (a copy: the lock is held for no call).
    fn device_fits(&self) -> BTreeMap<String, BTreeMap<String, Option<usize>>> {
        self.ctx.device_fits.lock().map(|f| f.clone()).unwrap_or_default()
    }

    /// Cancels an unfinished job and stops its shards running here; returns it as it ended (it may
    /// have finished otherwise meanwhile).
    async fn cancel(&self, job_id: &str, reason: &str, caller: &Caller) -> Result<JobRecord, ServiceError> {
        let finished = self.ctx.queue.finish_job(job_id, JobState::Cancelled, Some(reason), None).await?;
        self.ctx.active.stop_job(job_id);
        let job = finished.ok_or_else(|| ServiceError::NotFound(job_id.to_string()))?;
        if job.state == JobState::Cancelled {
            metrics::counter!("ddpm_jobs_finished_total", "state" => "cancelled").increment(1);
            tracing::info!(job_id, by = caller.name, reason, "job cancelled");
        }
        Ok(job)
    }

    /// DeleteJob: cancels the job if it runs, deletes it, then its objects (see the proto).
    async fn delete(&self, job_id: &str, caller: &Caller) -> Result<pb::DeleteJobResponse, ServiceError> {
        let mut job = self.get(job_id).await?;
        caller.require_owner_or_admin(&job.spec.owner)?;
        // A FAILED job retried between the two calls runs again: cancel it again (a few times at most).
        for _ in 0..3 {
            if !job.state.is_terminal() {
                self.cancel(&job.id, "deleted by request", caller).await?;
            }
            job = self.ctx.queue.delete_job(&job.id, false).await?.ok_or(ServiceError::NotFound(job.id))?;
            if job.state.is_terminal() {
                break;
            }
        }
        if !job.state.is_terminal() {
            return Err(ServiceError::Conflict(format!("job {} keeps being run again; not deleted", job.id)));
        }
        metrics::counter!("ddpm_jobs_deleted_total", "reason" => "request").increment(1);
        let objects_deleted = match self.ctx.remove_outputs(&job).await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(job_id = job.id, error = %e, "deleting a job's objects; the cleanup tries again");
                0
            }
        };
        tracing::info!(job_id = job.id, by = caller.name, objects_deleted, "job deleted");
        Ok(pb::DeleteJobResponse { job: Some(convert::job_to_pb(&job, Vec::new())), objects_deleted })
    }

    async fn get(&self, job_id: &str) -> Result<JobRecord, ServiceError> {
        let job_id = convert::job_id(job_id)?;
        self.ctx.queue.job(job_id).await?.ok_or_else(|| ServiceError::NotFound(job_id.to_string()))
    }

    /// SubmitJob, in its span (see [`pb::worker_service_server::WorkerService::submit_job`]).
    async fn submit(
        &self,
        request: Request<pb::SubmitJobRequest>,
        parent: &opentelemetry::Context,
    ) -> Result<Response<pb::SubmitJobResponse>, Status> {
        let started = std::time::Instant::now();
        let caller = self.caller(&request, Role::Submit)?;
        let req = request.into_inner();
        if self.ctx.draining.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(ServiceError::ShuttingDown.into());
        }
        if let Some(failure) = self.ctx.device_failure.get() {
            return Err(ServiceError::Unhealthy(failure.clone()).into());
        }
        let checked = match self.extended(&req).await {
            Ok(checked) => self.validate(&checked, &caller),
            Err(e) => Err(e),
        };
        let mut spec = checked.inspect_err(|_| {
            metrics::counter!("ddpm_jobs_submitted_total", "result" => "invalid").increment(1);
        })?;
        spec.trace_context = crate::telemetry::job_trace_context(&tracing::Span::current(), parent);
        // The spec as the client sent it (before defaults, so a retry of a seedless request matches),
        // and who sent it: another caller's request_id is another request.
        let key = (!req.request_id.is_empty()).then(|| {
            let mut sent = req.spec.clone().unwrap_or_default().encode_to_vec();
            sent.extend_from_slice(caller.name.as_bytes());
            // Each caller's request ids are its own (a token's name has no newline).
            let request_id = if caller.name == ANONYMOUS {
                req.request_id.clone()
            } else {
                format!("{}\n{}", caller.name, req.request_id)
            };
            IdempotencyKey { request_id, request_hash: crate::digest::sha256_hex(&sent) }
        });
        let outcome = self
            .ctx
            .queue
            .submit(&spec, key.as_ref(), self.limits.batches_per_shard(&spec), self.limits.max_attempts)
            .await
            .map_err(|e| match ServiceError::from(e) {
                ServiceError::IdempotencyConflict { job_id, .. } => {
                    ServiceError::IdempotencyConflict { request_id: req.request_id.clone(), job_id }
                }
                other => other,
            })?;
        tracing::Span::current().record("job_id", outcome.job.id.as_str());
        let result = if outcome.created { "created" } else { "existing" };
        metrics::counter!("ddpm_jobs_submitted_total", "result" => result).increment(1);
        metrics::histogram!("ddpm_submit_duration_seconds").record(started.elapsed().as_secs_f64());
        if outcome.created {
            tracing::info!(
                job_id = outcome.job.id,
                owner = caller.name,
                model = spec.model,
                num_samples = spec.num_samples,
                shards = outcome.job.shards_total,
                "job queued"
            );
            self.ctx.wake.notify_waiters();
        }
        Ok(Response::new(pb::SubmitJobResponse { job: Some(self.to_pb(&outcome.job).await) }))
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchJobResponse, Status>> + Send>>;

/// Runs an RPC's handler and counts it: `ddpm_grpc_requests_total{method,code}` and
/// `ddpm_grpc_request_duration_seconds{method}` (WatchJob: until its stream starts).
async fn observed<T>(
    method: &'static str,
    call: impl std::future::Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    let started = std::time::Instant::now();
    let result = call.await;
    let code = match &result {
        Ok(_) => tonic::Code::Ok,
        Err(status) => status.code(),
    };
    metrics::counter!("ddpm_grpc_requests_total", "method" => method, "code" => format!("{code:?}"))
        .increment(1);
    metrics::histogram!("ddpm_grpc_request_duration_seconds", "method" => method)
        .record(started.elapsed().as_secs_f64());
    result
}

#[tonic::async_trait]
impl pb::worker_service_server::WorkerService for WorkerService {
    async fn submit_job(
        &self,
        request: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::SubmitJobResponse>, Status> {
        // The caller's W3C trace context: this span's parent, and (as this span) the job's.
        let parent = crate::telemetry::extract_grpc(request.metadata());
        let span = tracing::info_span!(
            "ddpm.v1.WorkerService/SubmitJob",
            otel.kind = "server",
            job_id = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        crate::telemetry::set_parent_context(&span, &parent);
        // Trace-only attributes, kept out of the log lines.
        span.set_attribute("rpc.system", "grpc");
        span.set_attribute("rpc.service", "ddpm.v1.WorkerService");
        span.set_attribute("rpc.method", "SubmitJob");
        let result = observed("SubmitJob", self.submit(request, &parent).instrument(span.clone())).await;
        let code = match &result {
            Ok(_) => tonic::Code::Ok,
            Err(status) => status.code(),
        };
        span.set_attribute("rpc.grpc.status_code", code as i64);
        if code != tonic::Code::Ok {
            span.record("otel.status_code", "ERROR");
        }
        result
    }

    async fn list_models(
        &self,
        request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        observed("ListModels", async move {
            self.caller(&request, Role::Read)?;
            let fits = self.device_fits();
            let models =
                self.ctx.models.values().map(|m| convert::model_to_pb(m, &self.limits, &fits)).collect();
            Ok(Response::new(pb::ListModelsResponse { models }))
        })
        .await
    }

    async fn get_model(
        &self,
        request: Request<pb::GetModelRequest>,
    ) -> Result<Response<pb::GetModelResponse>, Status> {
        observed("GetModel", async move {
            self.caller(&request, Role::Read)?;
            let name = request.into_inner().name;
            convert::name_in("name", &name)?;
            let Some(model) = self.ctx.models.get(&name) else {
                let served = self.ctx.models.keys().cloned().collect::<Vec<_>>().join(", ");
                return Err(ServiceError::ModelNotFound { name, served }.into());
            };
            let model = convert::model_to_pb(model, &self.limits, &self.device_fits());
            Ok(Response::new(pb::GetModelResponse { model: Some(model) }))
        })
        .await
    }

    async fn get_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::GetJobResponse>, Status> {
        observed("GetJob", async move {
            self.caller(&request, Role::Read)?;
            let job = self.get(&request.into_inner().job_id).await?;
            let stats = self.ctx.queue.shard_stats(&job.id).await.map_err(ServiceError::from)?;
            let mut shown = self.to_pb(&job).await;
            shown.shard_stats = stats.as_ref().map(convert::shard_stats_to_pb);
            Ok(Response::new(pb::GetJobResponse { job: Some(shown) }))
        })
        .await
    }

    async fn list_jobs(
        &self,
        request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        observed("ListJobs", async move {
            self.caller(&request, Role::Read)?;
            let req = request.into_inner();
            let mut states = Vec::new();
            for s in &req.states {
                states.push(
                    convert::state_from_pb(*s)
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
                    convert::decode_cursor(token)
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
            let next_page_token = if more {
                jobs.last().map(convert::encode_cursor).unwrap_or_default()
            } else {
                String::new()
            };
            let mut out = Vec::with_capacity(jobs.len());
            for job in &jobs {
                out.push(self.to_pb(job).await);
            }
            Ok(Response::new(pb::ListJobsResponse { jobs: out, next_page_token }))
        })
        .await
    }

    async fn cancel_job(
        &self,
        request: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::CancelJobResponse>, Status> {
        observed("CancelJob", async move {
            let caller = self.caller(&request, Role::Submit)?;
            let job = self.get(&request.into_inner().job_id).await?;
            caller.require_owner_or_admin(&job.spec.owner)?;
            let job = match job.state {
                JobState::Succeeded | JobState::Failed => {
                    return Err(
                        ServiceError::AlreadyFinished { job_id: job.id, state: job.state.as_str() }.into()
                    );
                }
                JobState::Cancelled => job,
                JobState::Queued | JobState::Running => {
                    self.cancel(&job.id, "cancelled by request", &caller).await?
                }
            };
            Ok(Response::new(pb::CancelJobResponse { job: Some(self.to_pb(&job).await) }))
        })
        .await
    }

    async fn retry_job(
        &self,
        request: Request<pb::RetryJobRequest>,
    ) -> Result<Response<pb::RetryJobResponse>, Status> {
        observed("RetryJob", async move {
            let caller = self.caller(&request, Role::Submit)?;
            let job = self.get(&request.into_inner().job_id).await?;
            caller.require_owner_or_admin(&job.spec.owner)?;
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
            tracing::info!(job_id = job.id, by = caller.name, "job retried");
            self.ctx.wake.notify_waiters();
            Ok(Response::new(pb::RetryJobResponse { job: Some(self.to_pb(&job).await) }))
        })
        .await
    }

    async fn delete_job(
        &self,
        request: Request<pb::DeleteJobRequest>,
    ) -> Result<Response<pb::DeleteJobResponse>, Status> {
        observed("DeleteJob", async move {
            let caller = self.caller(&request, Role::Submit)?;
            Ok(Response::new(self.delete(&request.into_inner().job_id, &caller).await?))
        })
        .await
    }

    type WatchJobStream = WatchStream;

    async fn watch_job(
        &self,
        request: Request<pb::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        observed("WatchJob", async move {
            self.caller(&request, Role::Read)?;
            let first = self.get(&request.into_inner().job_id).await?;
            let (tx, rx) = tokio::sync::mpsc::channel(16);
            let ctx = Arc::clone(&self.ctx);
            let service = self.clone();
            tokio::spawn(async move {
                let mut last = first;
                if tx.send(Ok(pb::WatchJobResponse { job: Some(service.to_pb(&last).await) })).await.is_err()
                {
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
                        Ok(None) => {
                            let _ = tx.send(Err(ServiceError::NotFound(last.id.clone()).into())).await;
                            break;
                        }
                        Err(e) => {
                            let _ = tx.send(Err(Status::from(ServiceError::from(e)))).await;
                            break;
                        }
                    };
                    if job != last {
                        if tx
                            .send(Ok(pb::WatchJobResponse { job: Some(service.to_pb(&job).await) }))
                            .await
                            .is_err()
                        {
                            return; // the client went away
                        }
                        last = job;
                    }
                }
            });
            let stream: WatchStream = Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx));
            Ok(Response::new(stream))
        })
        .await
    }
}
