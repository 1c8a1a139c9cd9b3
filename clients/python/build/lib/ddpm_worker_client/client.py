"""The ddpm-worker client: submit jobs, follow them, list and cancel them.

    from ddpm_worker_client import Client

    with Client("https://ddpm-worker:50051", token_file="/run/secrets/ddpm-token", ca="ca.pem") as client:
        job = client.submit("cifar10", num_samples=1000, scheduler="ddim", steps=50)
        job.wait(progress=True)
        print(job.manifest_uri)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Iterator, Mapping, Optional, Sequence, Union

import grpc
from google.protobuf import json_format

from ._pb.ddpm.v1 import worker_pb2 as pb
from ._pb.ddpm.v1 import worker_pb2_grpc as pb_grpc
from .errors import JobCancelled, JobFailed, from_rpc_error

PathLike = Union[str, Path]

#: The job states, as `Job.state` gives them.
STATES = ("QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")
FINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})

SCHEDULERS = {
    "ddpm": pb.SCHEDULER_DDPM,
    "ddim": pb.SCHEDULER_DDIM,
    "pndm": pb.SCHEDULER_PNDM,
    "dpmsolver": pb.SCHEDULER_DPMSOLVER,
}
FORMATS = {
    "files": pb.OUTPUT_FORMAT_FILES,
    "webdataset": pb.OUTPUT_FORMAT_WEBDATASET,
    "parquet": pb.OUTPUT_FORMAT_PARQUET,
}
IMAGE_FORMATS = {"png": pb.IMAGE_FORMAT_PNG, "webp": pb.IMAGE_FORMAT_WEBP, "jpeg": pb.IMAGE_FORMAT_JPEG}

# Calls worth making again once the server is back: it was out of reach, draining, or the connection
# broke mid-stream.
_TRANSIENT = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED}
)


def _read(path: Optional[PathLike]) -> Optional[bytes]:
    return None if path is None else Path(path).read_bytes()


class Job:
    """A job as the server last reported it. `wait()` follows it to its end."""

    def __init__(self, client: "Client", message: pb.Job) -> None:
        self._client = client
        self._message = message

    @property
    def message(self) -> pb.Job:
        """The `ddpm.v1.Job` message itself."""
        return self._message

    @property
    def id(self) -> str:
        return self._message.job_id

    @property
    def state(self) -> str:
        """QUEUED, RUNNING, SUCCEEDED, FAILED or CANCELLED."""
        return pb.JobState.Name(self._message.state).removeprefix("JOB_STATE_")

    @property
    def done(self) -> bool:
        return self.state in FINAL_STATES

    @property
    def seed(self) -> int:
        """Sample i's noise comes from a generator seeded seed + i."""
        return self._message.spec.seed

    @property
    def samples_done(self) -> int:
        return self._message.samples_done

    @property
    def samples_total(self) -> int:
        return self._message.samples_total

    @property
    def owner(self) -> str:
        return self._message.owner

    @property
    def manifest_uri(self) -> str:
        """The manifest (SUCCEEDED only): every data file and index part with its SHA-256."""
        return self._message.manifest_uri

    @property
    def grid_uris(self) -> list[str]:
        return list(self._message.grid_uris)

    @property
    def error(self) -> str:
        """Why the job FAILED or was CANCELLED ("" otherwise)."""
        return self._message.error.message if self._message.HasField("error") else ""

    def to_dict(self) -> dict:
        """The job in the protobuf JSON mapping (as `ddpm-worker status --output json` prints it)."""
        return json_format.MessageToDict(self._message)

    def refresh(self) -> "Job":
        """Fetches the job's current state."""
        self._message = self._client.get(self.id).message
        return self

    def cancel(self) -> "Job":
        self._message = self._client.cancel(self.id).message
        return self

    def wait(self, progress: bool = False, check: bool = True, reconnect_seconds: float = 600.0) -> "Job":
        """Follows the job (WatchJob) until it is SUCCEEDED, FAILED or CANCELLED.

        A server that drains (SIGTERM) or restarts ends the stream; the watch is made again, for up to
        `reconnect_seconds` of no answer in a row. With `check`, a FAILED job raises JobFailed and a
        CANCELLED one JobCancelled; the job's final state is on `self` either way. `progress` draws a
        progress line on stderr.
        """
        for message in self._client._watch(self.id, reconnect_seconds):
            self._message = message
            if progress:
                sys.stderr.write(f"\r{self.id}: {self.samples_done}/{self.samples_total} samples, {self.state.lower()}   ")
                sys.stderr.flush()
        if progress:
            sys.stderr.write("\n")
        if check and self.state == "FAILED":
            raise JobFailed(self)
        if check and self.state == "CANCELLED":
            raise JobCancelled(self)
        return self

    def __repr__(self) -> str:
        return f"Job(id={self.id!r}, state={self.state}, samples={self.samples_done}/{self.samples_total})"


class Client:
    """A connection to a ddpm-worker server.

    `url` is http://HOST:PORT (plaintext) or https://HOST:PORT (TLS, trusting `ca` or the system's
    roots). `token` or `token_file` (its first line) is the bearer token; `cert` and `key` a client
    certificate for servers that ask for one (mTLS). `timeout` is the deadline of each unary call.
    """

    def __init__(
        self,
        url: str = "http://127.0.0.1:50051",
        *,
        token: Optional[str] = None,
        token_file: Optional[PathLike] = None,
        ca: Optional[PathLike] = None,
        cert: Optional[PathLike] = None,
        key: Optional[PathLike] = None,
        timeout: float = 30.0,
    ) -> None:
        if token_file is not None:
            lines = Path(token_file).read_text().splitlines()
            token = lines[0].strip() if lines else ""
            if not token:
                raise ValueError(f"{token_file}: no token in it")
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._timeout = timeout
        tls = url.startswith("https://") or ca is not None or cert is not None
        target = url.split("://", 1)[-1].rstrip("/")
        # Reconnect quickly after a restart (gRPC's default backoff grows to two minutes).
        options = [("grpc.initial_reconnect_backoff_ms", 250), ("grpc.max_reconnect_backoff_ms", 5000)]
        if tls:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(ca), private_key=_read(key), certificate_chain=_read(cert)
            )
            self._channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._stub = pb_grpc.WorkerServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method, request):
        try:
            return method(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    def submit(
        self,
        model: str,
        num_samples: int,
        *,
        scheduler: str = "ddpm",
        steps: int = 1000,
        eta: Optional[float] = None,
        seed: Optional[int] = None,
        batch_size: int = 0,
        samples_per_grid: Optional[int] = None,
        grid_columns: int = 0,
        destination: str = "",
        prefix: str = "",
        format: Optional[str] = None,
        image_format: Optional[str] = None,
        jpeg_quality: int = 0,
        png_level: int = 0,
        target_file_bytes: int = 0,
        priority: int = 0,
        labels: Optional[Mapping[str, str]] = None,
        request_id: str = "",
    ) -> Job:
        """Queues a job and returns it (QUEUED).

        `scheduler` is ddpm, ddim, pndm or dpmsolver; `format` files, webdataset or parquet (default:
        the server's); `image_format` png, webp or jpeg. `destination` (s3://BUCKET/PREFIX or
        file:/DIR) must lie within the server's allowed destinations; empty means its default output.
        With a `request_id`, submitting the same job again returns the first one. See
        proto/ddpm/v1/worker.proto for every field's limits.
        """
        try:
            sampler = SCHEDULERS[scheduler]
            layout = FORMATS[format] if format else pb.OUTPUT_FORMAT_UNSPECIFIED
            encoding = IMAGE_FORMATS[image_format] if image_format else pb.IMAGE_FORMAT_UNSPECIFIED
        except KeyError as e:
            raise ValueError(f"unknown value {e.args[0]!r}") from None
        spec = pb.JobSpec(
            model=model,
            sampling=pb.SamplingSpec(scheduler=sampler, steps=steps),
            num_samples=num_samples,
            batch_size=batch_size,
            output=pb.OutputSpec(
                destination=destination,
                prefix=prefix,
                format=layout,
                image_format=encoding,
                jpeg_quality=jpeg_quality,
                png_level=png_level,
                target_file_bytes=target_file_bytes,
            ),
            priority=priority,
            labels=dict(labels or {}),
        )
        # Optional fields: set only when given (absent means the server's default).
        if eta is not None:
            spec.sampling.eta = eta
        if seed is not None:
            spec.seed = seed
        if samples_per_grid is not None:
            spec.grid.CopyFrom(pb.GridSpec(samples_per_grid=samples_per_grid, columns=grid_columns))
        response = self._call(self._stub.SubmitJob, pb.SubmitJobRequest(request_id=request_id, spec=spec))
        return Job(self, response.job)

    def get(self, job_id: str) -> Job:
        return Job(self, self._call(self._stub.GetJob, pb.GetJobRequest(job_id=job_id)).job)

    def cancel(self, job_id: str) -> Job:
        """Cancels a QUEUED or RUNNING job (a CANCELLED one is returned as it is)."""
        return Job(self, self._call(self._stub.CancelJob, pb.CancelJobRequest(job_id=job_id)).job)

    def retry(self, job_id: str) -> Job:
        """Runs a FAILED job again; its finished shards are kept."""
        return Job(self, self._call(self._stub.RetryJob, pb.RetryJobRequest(job_id=job_id)).job)

    def list(
        self,
        states: Sequence[str] = (),
        labels: Optional[Mapping[str, str]] = None,
        limit: Optional[int] = None,
        page_size: int = 100,
    ) -> Iterator[Job]:
        """Jobs, newest first, fetched a page at a time; `states` as Job.state gives them."""
        wanted = [pb.JobState.Value(f"JOB_STATE_{s.upper()}") for s in states]
        token, seen = "", 0
        while True:
            request = pb.ListJobsRequest(states=wanted, labels=dict(labels or {}), page_size=page_size, page_token=token)
            page = self._call(self._stub.ListJobs, request)
            for message in page.jobs:
                if limit is not None and seen >= limit:
                    return
                seen += 1
                yield Job(self, message)
            token = page.next_page_token
            if not token:
                return

    def _watch(self, job_id: str, reconnect_seconds: float) -> Iterator[pb.Job]:
        """WatchJob's jobs until the job ends, watching again across drains and restarts."""
        out_of_reach: Optional[float] = None
        pause = 0.25
        last: Optional[pb.Job] = None
        while True:
            try:
                for event in self._stub.WatchJob(pb.WatchJobRequest(job_id=job_id), metadata=self._metadata):
                    out_of_reach, pause = None, 0.25
                    last = event.job
                    yield event.job
                return
            except grpc.RpcError as e:
                if e.code() not in _TRANSIENT:
                    raise from_rpc_error(e) from None
                if last is not None and pb.JobState.Name(last.state).removeprefix("JOB_STATE_") in FINAL_STATES:
                    return
                now = time.monotonic()
                out_of_reach = out_of_reach if out_of_reach is not None else now
                if now - out_of_reach >= reconnect_seconds:
                    raise from_rpc_error(e) from None
                time.sleep(pause)
                pause = min(pause * 2, 5.0)
