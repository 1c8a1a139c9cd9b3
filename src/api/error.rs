//! Every error the API can return, mapped to a gRPC status in one place.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::queue::QueueError;

/// One bad field of a request: its path (`sampling.steps`) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: String,
    pub description: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("invalid request: {}", .0.iter().map(|v| format!("{}: {}", v.field, v.description)).collect::<Vec<_>>().join("; "))]
    InvalidArgument(Vec<FieldViolation>),
    #[error("job {0} not found")]
    NotFound(String),
    #[error("model {name:?} not found; this server has {served}")]
    ModelNotFound { name: String, served: String },
    #[error("request_id {request_id:?} was already used for a different request (job {job_id})")]
    IdempotencyConflict { request_id: String, job_id: String },
    #[error("job {job_id} is already {state}")]
    AlreadyFinished { job_id: String, state: &'static str },
    #[error("job {job_id} is {state}; only a failed job can be retried")]
    NotFailed { job_id: String, state: &'static str },
    #[error("job {job_id} is {state}; only a succeeded job can be extended")]
    NotExtendable { job_id: String, state: &'static str },
    /// Another request keeps changing the job: try again.
    #[error("{0}")]
    Conflict(String),
    #[error("the job queue is unavailable: {0}")]
    Queue(QueueError),
    #[error("the worker is shutting down")]
    ShuttingDown,
    /// This worker lost a device and waits to be restarted; another worker can take the job.
    #[error("this worker lost a device and takes no new jobs: {0}")]
    Unhealthy(String),
    /// No credentials, or unknown ones (the token itself is never in the message).
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// Known caller, not allowed this (a role too low, another's job, a destination outside the
    /// allow-list).
    #[error("permission denied: {0}")]
    PermissionDenied(String),
}

impl ServiceError {
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        ServiceError::InvalidArgument(vec![FieldViolation {
            field: field.into(),
            description: description.into(),
        }])
    }
}

impl From<QueueError> for ServiceError {
    fn from(e: QueueError) -> Self {
        match e {
            QueueError::IdempotencyConflict { request_id, job_id } => {
                ServiceError::IdempotencyConflict { request_id, job_id }
            }
            other => ServiceError::Queue(other),
        }
    }
}

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Status {
        let message = e.to_string();
        match e {
            ServiceError::InvalidArgument(violations) => {
                let mut details = ErrorDetails::new();
                for v in &violations {
                    details.add_bad_request_violation(v.field.clone(), v.description.clone());
                }
                Status::with_error_details(Code::InvalidArgument, message, details)
            }
            ServiceError::NotFound(_) | ServiceError::ModelNotFound { .. } => Status::not_found(message),
            ServiceError::IdempotencyConflict { .. } => Status::already_exists(message),
            ServiceError::AlreadyFinished { .. }
            | ServiceError::NotFailed { .. }
            | ServiceError::NotExtendable { .. } => Status::failed_precondition(message),
            ServiceError::Conflict(_) => Status::aborted(message),
            ServiceError::Queue(QueueError::Corrupt(_) | QueueError::Invalid(_)) => {
                tracing::error!(error = message, "queue store");
                Status::internal(message)
            }
            ServiceError::Queue(_) | ServiceError::ShuttingDown | ServiceError::Unhealthy(_) => {
                Status::unavailable(message)
            }
            ServiceError::Unauthenticated(_) => {
                metrics::counter!("ddpm_auth_refused_total", "code" => "unauthenticated").increment(1);
                Status::unauthenticated(message)
            }
            ServiceError::PermissionDenied(_) => {
                metrics::counter!("ddpm_auth_refused_total", "code" => "permission_denied").increment(1);
                Status::permission_denied(message)
            }
        }
    }
}
