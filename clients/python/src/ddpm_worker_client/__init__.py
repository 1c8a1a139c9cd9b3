"""Python client of ddpm-worker: queue image-generation jobs, follow them, list and cancel them.

The gRPC stubs are generated from the service's proto (package ddpm.v1) when this package is built.
"""

from .aio import AsyncClient, AsyncJob
from .client import FINAL_STATES, STATES, Client, Job, JobView, Model
from .errors import (
    AlreadyExists,
    Error,
    FailedPrecondition,
    InvalidArgument,
    JobCancelled,
    JobFailed,
    JobNotSucceeded,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)

__all__ = [
    "FINAL_STATES",
    "STATES",
    "AlreadyExists",
    "AsyncClient",
    "AsyncJob",
    "Client",
    "Error",
    "FailedPrecondition",
    "InvalidArgument",
    "Job",
    "JobCancelled",
    "JobFailed",
    "JobNotSucceeded",
    "JobView",
    "Model",
    "NotFound",
    "PermissionDenied",
    "Unauthenticated",
    "Unavailable",
]
