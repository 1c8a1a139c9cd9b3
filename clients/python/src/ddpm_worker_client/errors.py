"""Errors of the client: a gRPC status becomes the subclass of `Error` for its code."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:
    from .client import Job


class Error(Exception):
    """A call the server refused, or could not be reached for. `code` is the gRPC status code."""

    def __init__(self, code: grpc.StatusCode, message: str, fields: dict[str, str] | None = None) -> None:
        self.code = code
        self.message = message
        #: For InvalidArgument: each bad field's path (`spec.sampling.steps`) and what is wrong.
        self.fields = fields or {}
        detail = "".join(f"\n  {k}: {v}" for k, v in self.fields.items())
        super().__init__(f"{code.name}: {message}{detail}")


class InvalidArgument(Error):
    """A request field is wrong; `fields` names each one."""


class NotFound(Error):
    """No such job."""


class Unauthenticated(Error):
    """No token, or an unknown one."""


class PermissionDenied(Error):
    """The token's role is too low, the job is another's, or the destination is not allowed."""


class FailedPrecondition(Error):
    """The job is not in a state that allows this (cancelling a finished job, retrying a live one)."""


class AlreadyExists(Error):
    """The request_id was already used for a different job."""


class Unavailable(Error):
    """The server is out of reach or draining; try again."""


_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: Unavailable,
}


def _field_violations(error: grpc.RpcError) -> dict[str, str]:
    """The google.rpc.BadRequest of an INVALID_ARGUMENT, from its grpc-status-details-bin trailer."""
    from google.rpc import error_details_pb2, status_pb2

    for key, value in error.trailing_metadata() or ():
        if key != "grpc-status-details-bin":
            continue
        status = status_pb2.Status.FromString(value)
        fields = {}
        for detail in status.details:
            bad = error_details_pb2.BadRequest()
            if detail.Unpack(bad):
                fields.update({v.field: v.description for v in bad.field_violations})
        return fields
    return {}


def from_rpc_error(error: grpc.RpcError) -> Error:
    code = error.code()
    cls = _BY_CODE.get(code, Error)
    fields = _field_violations(error) if code == grpc.StatusCode.INVALID_ARGUMENT else None
    return cls(code, error.details() or "", fields)


class JobNotSucceeded(Exception):
    """`Job.wait()` on a job that did not succeed; `job` is it, in its final state."""

    def __init__(self, job: "Job") -> None:
        self.job = job
        super().__init__(f"job {job.id} ended {job.state}" + (f": {job.error}" if job.error else ""))


class JobFailed(JobNotSucceeded):
    pass


class JobCancelled(JobNotSucceeded):
    pass
