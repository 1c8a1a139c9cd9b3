"""The ddpm-worker client: submit jobs, follow them, list and cancel them.

    from ddpm_worker_client import Client

    with Client("https://ddpm-worker:50051", token_file="/run/secrets/ddpm-token", ca="ca.pem") as client:
        job = client.submit("cifar10", num_samples=1000, scheduler="ddim", steps=50)
        job.wait(progress=True)
        print(job.manifest_uri)
"""

from __future__ import annotations

import datetime
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

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


def _local(uri: str) -> str:
    """A file:// URI as a path; any other URI (s3://…) as it is, for fsspec."""
    return uri[len("file://") :] if uri.startswith("file://") else uri


def _read_uri(uri: str, storage_options: Optional[Mapping[str, Any]]) -> bytes:
    if uri.startswith("file://"):
        return Path(_local(uri)).read_bytes()
    import fsspec  # with `datasets`; s3:// needs s3fs (the client's [datasets] extra)

    with fsspec.open(uri, "rb", **dict(storage_options or {})) as f:
        return f.read()


class JobView:
    """What every job object shows of the job, as the server last reported it."""

    def __init__(self, client: Any, message: pb.Job) -> None:
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
    def samples_per_second(self) -> Optional[float]:
        """Samples stored per second since the job started (to its end); None until one is stored."""
        return self._message.samples_per_second if self._message.HasField("samples_per_second") else None

    @property
    def estimated_finish_time(self) -> Optional[datetime.datetime]:
        """When a RUNNING job should end at its pace (UTC); None otherwise."""
        if not self._message.HasField("estimated_finish_time"):
            return None
        return self._message.estimated_finish_time.ToDatetime(tzinfo=datetime.timezone.utc)

    @property
    def shard_stats(self) -> Optional[dict]:
        """How its shards ran, as GetJob (`refresh`, `Client.get`) reports it: `attempts`, `retried`,
        `failed` and `runners` (`{"worker/device": shards}`); None on a job from a list or a watch."""
        if not self._message.HasField("shard_stats"):
            return None
        stats = self._message.shard_stats
        return {
            "attempts": stats.attempts,
            "retried": stats.retried,
            "failed": stats.failed,
            "runners": {f"{r.worker}/{r.device}": r.shards for r in stats.runners},
        }

    @property
    def extends(self) -> str:
        """The job this one continues ("" when none)."""
        return self._message.spec.extends

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

    def manifest(self, storage_options: Optional[Mapping[str, Any]] = None) -> dict:
        """The job's manifest (SUCCEEDED only): its spec, model, every file with its SHA-256."""
        if not self.manifest_uri:
            raise ValueError(f"job {self.id} is {self.state}: only a SUCCEEDED job has a manifest")
        return json.loads(_read_uri(self.manifest_uri, storage_options))

    def open_dataset(self, *, streaming: bool = False, storage_options: Optional[Mapping[str, Any]] = None):
        """The job's samples, to train on (SUCCEEDED only).

        - parquet: a `datasets.Dataset` (an `IterableDataset` with `streaming`) whose `image` column
          decodes to PIL images, in sample order;
        - webdataset: the tar shards' URLs in sample order, for `webdataset.WebDataset(urls)` (local
          paths; s3:// URLs open with fsspec); `data/wids.json` beside them is `wids`' shard index;
        - files: a `datasets.Dataset` of the images (`imagefolder`), in sample order.

        Local outputs are read in place, S3 ones through fsspec: `pip install
        "ddpm-worker-client[datasets]"` brings `datasets` and s3fs, and `storage_options` are s3fs'
        (e.g. {"key": ..., "secret": ..., "client_kwargs": {"endpoint_url": ...}}).
        """
        manifest = self.manifest(storage_options)
        folder = self.manifest_uri.rsplit("/", 1)[0]
        # Jobs queued before layouts existed have none: PNG files.
        dataset = manifest["spec"].get("dataset", {})
        layout = dataset.get("format", "files")
        urls = [_local(f"{folder}/{f['path']}") for f in manifest["files"]]
        if layout == "webdataset":
            return urls
        import datasets

        options = dict(storage_options or {}) or None
        if layout == "parquet":
            return datasets.load_dataset(
                "parquet", data_files=urls, split="train", streaming=streaming, storage_options=options
            )
        image = dataset.get("image", "png")
        ext = "jpg" if image == "jpeg" else image
        pattern = _local(f"{folder}/samples/*.{ext}")
        return datasets.load_dataset(
            "imagefolder", data_files=pattern, split="train", streaming=streaming, storage_options=options
        )

    def _ended(self, check: bool) -> None:
        if check and self.state == "FAILED":
            raise JobFailed(self)
        if check and self.state == "CANCELLED":
            raise JobCancelled(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.id!r}, state={self.state}, samples={self.samples_done}/{self.samples_total})"


class _Progress:
    """A job's progress on stderr: a tqdm bar where tqdm is installed, a line otherwise."""

    def __init__(self, job: JobView, shown: bool) -> None:
        self._job, self._bar, self._shown = job, None, shown
        if shown:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=job.samples_total, desc=job.id[:8], unit="sample")
            except ImportError:
                pass

    def update(self) -> None:
        job = self._job
        if self._bar is not None:
            self._bar.update(job.samples_done - self._bar.n)
            self._bar.set_postfix_str(job.state.lower())
        elif self._shown:
            sys.stderr.write(f"\r{job.id}: {job.samples_done}/{job.samples_total} samples, {job.state.lower()}   ")
            sys.stderr.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self._shown:
            sys.stderr.write("\n")


class Job(JobView):
    """A job as the server last reported it. `wait()` follows it to its end."""

    def refresh(self) -> "Job":
        """Fetches the job's current state."""
        self._message = self._client.get(self.id).message
        return self

    def cancel(self) -> "Job":
        self._message = self._client.cancel(self.id).message
        return self

    def delete(self) -> int:
        """Deletes this job and its objects: see `Client.delete`."""
        return self._client.delete(self.id)

    def extend(self, num_samples: int, **kwargs: Any) -> "Job":
        """Queues `num_samples` more samples of this (SUCCEEDED) job: see `Client.extend`."""
        return self._client.extend(self.id, num_samples, **kwargs)

    def wait(
        self,
        progress: bool = False,
        check: bool = True,
        reconnect_seconds: float = 600.0,
        timeout: Optional[float] = None,
    ) -> "Job":
        """Follows the job (WatchJob) until it is SUCCEEDED, FAILED or CANCELLED.

        A server that drains (SIGTERM) or restarts ends the stream; the watch is made again, for up to
        `reconnect_seconds` of no answer in a row. With `check`, a FAILED job raises JobFailed and a
        CANCELLED one JobCancelled; the job's final state is on `self` either way. `progress` shows a
        progress bar (tqdm, where installed) on stderr. After `timeout` seconds TimeoutError is raised;
        the job runs on.
        """
        bar = _Progress(self, progress)
        try:
            for message in self._client._watch(self.id, reconnect_seconds, timeout):
                self._message = message
                bar.update()
        finally:
            bar.close()
        self._ended(check)
        return self


def _submit_request(
    model: str,
    num_samples: int,
    *,
    scheduler: str = "ddim",
    steps: int = 50,
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
    webhook_url: str = "",
    class_counts: Optional[Mapping[int, int]] = None,
    guidance_scale: Optional[float] = None,
    null_class: Optional[int] = None,
    class_names: Optional[Sequence[str]] = None,
) -> pb.SubmitJobRequest:
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
        webhook_url=webhook_url,
    )
    # Optional fields: set only when given (absent means the server's default).
    if eta is not None:
        spec.sampling.eta = eta
    if seed is not None:
        spec.seed = seed
    if class_counts is not None or guidance_scale is not None or null_class is not None or class_names:
        classes = pb.ClassSpec(
            counts={int(k): int(v) for k, v in (class_counts or {}).items()},
            uniform=not class_counts,
            names=list(class_names or []),
        )
        if guidance_scale is not None:
            classes.guidance_scale = guidance_scale
        if null_class is not None:
            classes.null_class = null_class
        spec.classes.CopyFrom(classes)
    return _request(spec, samples_per_grid, grid_columns, request_id)


def _extend_request(
    job_id: str,
    num_samples: int,
    *,
    samples_per_grid: Optional[int] = None,
    grid_columns: int = 0,
    destination: str = "",
    prefix: str = "",
    priority: int = 0,
    labels: Optional[Mapping[str, str]] = None,
    request_id: str = "",
) -> pb.SubmitJobRequest:
    spec = pb.JobSpec(
        extends=job_id,
        num_samples=num_samples,
        output=pb.OutputSpec(destination=destination, prefix=prefix),
        priority=priority,
        labels=dict(labels or {}),
    )
    return _request(spec, samples_per_grid, grid_columns, request_id)


def _request(spec: pb.JobSpec, samples_per_grid: Optional[int], grid_columns: int, request_id: str):
    """The submission of `spec` with its grid, if given, and an idempotency key (one is made up when none
    is given, so that a submission retried after UNAVAILABLE queues one job)."""
    if samples_per_grid is not None:
        spec.grid.CopyFrom(pb.GridSpec(samples_per_grid=samples_per_grid, columns=grid_columns))
    return pb.SubmitJobRequest(request_id=request_id or f"py-{uuid.uuid4()}", spec=spec)


def _list_request(states: Sequence[str], labels: Optional[Mapping[str, str]], page_size: int, token: str):
    wanted = [pb.JobState.Value(f"JOB_STATE_{s.upper()}") for s in states]
    return pb.ListJobsRequest(states=wanted, labels=dict(labels or {}), page_size=page_size, page_token=token)


def _channel_options() -> list:
    """Quick reconnects after a restart (gRPC's default backoff grows to two minutes), and gRPC's own
    retries of UNAVAILABLE for the calls that are safe to repeat: every read, CancelJob, and SubmitJob
    (whose requests always carry a request_id)."""
    retried = ["SubmitJob", "GetJob", "ListJobs", "CancelJob", "ListModels", "GetModel"]
    config = {
        "methodConfig": [
            {
                "name": [{"service": "ddpm.v1.WorkerService", "method": m} for m in retried],
                "retryPolicy": {
                    "maxAttempts": 5,
                    "initialBackoff": "0.25s",
                    "maxBackoff": "4s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
    return [
        ("grpc.initial_reconnect_backoff_ms", 250),
        ("grpc.max_reconnect_backoff_ms", 5000),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", json.dumps(config)),
    ]


def _connect(channels, url: str, ca, cert, key, token, token_file):
    """A channel to `url` made by `channels` (the `grpc` or `grpc.aio` module), TLS where asked, and the
    call metadata with the bearer token."""
    if token_file is not None:
        lines = Path(token_file).read_text().splitlines()
        token = lines[0].strip() if lines else ""
        if not token:
            raise ValueError(f"{token_file}: no token in it")
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    tls = url.startswith("https://") or ca is not None or cert is not None
    target = url.split("://", 1)[-1].rstrip("/")
    if not tls:
        return channels.insecure_channel(target, options=_channel_options()), metadata
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(ca), private_key=_read(key), certificate_chain=_read(cert)
    )
    return channels.secure_channel(target, credentials, options=_channel_options()), metadata


class Model:
    """A model the server samples (`Client.models()`, `Client.model(name)`)."""

    def __init__(self, message: pb.Model) -> None:
        self.message = message

    @property
    def name(self) -> str:
        return self.message.name

    @property
    def shape(self) -> tuple[int, int, int]:
        """One sample's (channels, height, width)."""
        return (self.message.channels, self.message.height, self.message.width)

    @property
    def weights_sha256(self) -> str:
        return self.message.weights_sha256

    @property
    def schedulers(self) -> dict[str, int]:
        """Each scheduler the model takes (ddpm, ddim, …) and the most steps it may run."""
        return {
            pb.Scheduler.Name(s.scheduler).removeprefix("SCHEDULER_").lower(): s.max_steps
            for s in self.message.schedulers
        }

    @property
    def devices(self) -> dict[str, int]:
        """The server's devices (cpu, cuda:0, …) and the largest batch each samples."""
        return {d.device: d.max_batch_size for d in self.message.devices}

    @property
    def num_classes(self) -> int:
        """Class embeddings of a class-conditional model; 0 for an unconditional one."""
        return self.message.num_classes

    @property
    def class_names(self) -> list[str]:
        """Its class names by index (from its labels.json; empty when it gives none)."""
        return list(self.message.class_names)

    @property
    def null_class(self) -> Optional[int]:
        """The class it was trained with as "no class", for guidance; None when it names none."""
        return self.message.null_class if self.message.HasField("null_class") else None

    def to_dict(self) -> dict:
        return json_format.MessageToDict(self.message)

    def __repr__(self) -> str:
        return f"Model(name={self.name!r}, shape={self.shape}, schedulers={self.schedulers})"


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
        self._channel, self._metadata = _connect(grpc, url, ca, cert, key, token, token_file)
        self._timeout = timeout
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

    def submit(self, model: str, num_samples: int, **options: Any) -> Job:
        """Queues a job and returns it (QUEUED).

        Options, each optional: `scheduler` ddpm, ddim (the default, with `steps=50`), pndm or
        dpmsolver; `steps`; `eta`; `seed` (the server picks one when absent); `batch_size`;
        `samples_per_grid`, `grid_columns`; `destination` (s3://BUCKET/PREFIX or file:/DIR, within the
        server's allowed destinations; empty: its default output) and `prefix`; `format` files,
        webdataset or parquet (default: the server's); `image_format` png, webp or jpeg;
        `jpeg_quality`, `png_level`, `target_file_bytes`; `priority`; `labels`; `webhook_url` (gets the
        job's events, within the server's --allow-webhook prefixes); for a class-conditional model,
        `class_counts` ({class index: samples}, adding up to `num_samples`; default: every class
        equally), `guidance_scale` (classifier-free guidance weight), `null_class` (default: the model's)
        and `class_names`; `request_id` (an idempotency key:
        submitting the same job with it again returns the first one; one is made up when absent, so
        that a retry after UNAVAILABLE queues one job). See proto/ddpm/v1/worker.proto
        for every field's limits.
        """
        response = self._call(self._stub.SubmitJob, _submit_request(model, num_samples, **options))
        return Job(self, response.job)

    def extend(self, job_id: str, num_samples: int, **options: Any) -> Job:
        """Queues a job that continues `job_id` (a SUCCEEDED job) by `num_samples` samples: its model,
        sampling, batch size and layout, and the seeds after its last one, so the two jobs share no seed.
        Its manifest names the job it extends. Options: `destination` (default: the extended job's),
        `prefix`, `samples_per_grid`, `grid_columns`, `priority`, `labels`, `request_id`.
        """
        response = self._call(self._stub.SubmitJob, _extend_request(job_id, num_samples, **options))
        return Job(self, response.job)

    def models(self) -> list[Model]:
        """The models this server samples."""
        return [Model(m) for m in self._call(self._stub.ListModels, pb.ListModelsRequest()).models]

    def model(self, name: str) -> Model:
        """One model (NotFound when the server has none of that name)."""
        return Model(self._call(self._stub.GetModel, pb.GetModelRequest(name=name)).model)

    def get(self, job_id: str) -> Job:
        return Job(self, self._call(self._stub.GetJob, pb.GetJobRequest(job_id=job_id)).job)

    def cancel(self, job_id: str) -> Job:
        """Cancels a QUEUED or RUNNING job (a CANCELLED one is returned as it is)."""
        return Job(self, self._call(self._stub.CancelJob, pb.CancelJobRequest(job_id=job_id)).job)

    def delete(self, job_id: str) -> int:
        """Deletes a job and every object it wrote (a QUEUED or RUNNING job is cancelled first); the
        job is gone afterwards (`get` raises NotFound). Returns how many objects this call deleted."""
        return self._call(self._stub.DeleteJob, pb.DeleteJobRequest(job_id=job_id)).objects_deleted

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
        token, seen = "", 0
        while True:
            page = self._call(self._stub.ListJobs, _list_request(states, labels, page_size, token))
            for message in page.jobs:
                if limit is not None and seen >= limit:
                    return
                seen += 1
                yield Job(self, message)
            token = page.next_page_token
            if not token:
                return

    def _watch(self, job_id: str, reconnect_seconds: float, timeout: Optional[float]) -> Iterator[pb.Job]:
        """WatchJob's jobs until the job ends, watching again across drains and restarts."""
        follow = _Follow(job_id, reconnect_seconds, timeout)
        while True:
            try:
                stream = self._stub.WatchJob(
                    pb.WatchJobRequest(job_id=job_id), metadata=self._metadata, timeout=follow.remaining()
                )
                for event in stream:
                    yield follow.seen(event.job)
                return
            except grpc.RpcError as e:
                pause = follow.failed(e)
                if pause is None:
                    return
                time.sleep(pause)


class _Follow:
    """The rules of following a job across drains and restarts, for both clients: how long to pause
    after a broken stream, and when to give up."""

    def __init__(self, job_id: str, reconnect_seconds: float, timeout: Optional[float]) -> None:
        self.job_id, self.reconnect_seconds, self.timeout = job_id, reconnect_seconds, timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.out_of_reach: Optional[float] = None
        self.pause = 0.25
        self.last: Optional[pb.Job] = None

    def remaining(self) -> Optional[float]:
        return None if self.deadline is None else max(self.deadline - time.monotonic(), 0.0)

    def seen(self, job: pb.Job) -> pb.Job:
        self.out_of_reach, self.pause, self.last = None, 0.25, job
        return job

    def failed(self, e: grpc.RpcError) -> Optional[float]:
        """The pause before watching again; None when the job has ended. Raises when it is time to stop."""
        if self.deadline is not None and time.monotonic() >= self.deadline:
            state = pb.JobState.Name(self.last.state).removeprefix("JOB_STATE_") if self.last else "unseen"
            raise TimeoutError(f"job {self.job_id} is still {state} after {self.timeout} s") from None
        if e.code() not in _TRANSIENT:
            raise from_rpc_error(e) from None
        if self.last is not None and pb.JobState.Name(self.last.state).removeprefix("JOB_STATE_") in FINAL_STATES:
            return None
        now = time.monotonic()
        self.out_of_reach = self.out_of_reach if self.out_of_reach is not None else now
        if now - self.out_of_reach >= self.reconnect_seconds:
            raise from_rpc_error(e) from None
        pause, self.pause = self.pause, min(self.pause * 2, 5.0)
        return pause
