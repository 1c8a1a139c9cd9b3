"""The asyncio client (grpc.aio): the same calls as `Client`, awaited.

    from ddpm_worker_client.aio import AsyncClient

    async with AsyncClient("http://ddpm-worker:50051") as client:
        job = await client.submit("cifar10", 1000)
        await job.wait()
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Mapping, Optional, Sequence

import grpc

from ._pb.ddpm.v1 import worker_pb2 as pb
from ._pb.ddpm.v1 import worker_pb2_grpc as pb_grpc
from .client import (
    JobView,
    Model,
    PathLike,
    _connect,
    _extend_request,
    _Follow,
    _list_request,
    _Progress,
    _submit_request,
)
from .errors import from_rpc_error


class AsyncJob(JobView):
    """A job as the server last reported it; `await job.wait()` follows it to its end."""

    async def refresh(self) -> "AsyncJob":
        self._message = (await self._client.get(self.id)).message
        return self

    async def cancel(self) -> "AsyncJob":
        self._message = (await self._client.cancel(self.id)).message
        return self

    async def delete(self) -> int:
        """Deletes this job and its objects: see `Client.delete`."""
        return await self._client.delete(self.id)

    async def extend(self, num_samples: int, **options: Any) -> "AsyncJob":
        """Queues `num_samples` more samples of this (SUCCEEDED) job: see `Client.extend`."""
        return await self._client.extend(self.id, num_samples, **options)

    async def wait(
        self,
        progress: bool = False,
        check: bool = True,
        reconnect_seconds: float = 600.0,
        timeout: Optional[float] = None,
    ) -> "AsyncJob":
        """As `Job.wait`: follows the job to its end across drains and restarts."""
        bar = _Progress(self, progress)
        try:
            async for message in self._client._watch(self.id, reconnect_seconds, timeout):
                self._message = message
                bar.update()
        finally:
            bar.close()
        self._ended(check)
        return self


class AsyncClient:
    """A grpc.aio connection to a ddpm-worker server; the arguments are `Client`'s."""

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
        self._channel, self._metadata = _connect(grpc.aio, url, ca, cert, key, token, token_file)
        self._timeout = timeout
        self._stub = pb_grpc.WorkerServiceStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, method, request):
        try:
            return await method(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e) from None

    async def submit(self, model: str, num_samples: int, **options: Any) -> AsyncJob:
        """Queues a job: see `Client.submit`."""
        response = await self._call(self._stub.SubmitJob, _submit_request(model, num_samples, **options))
        return AsyncJob(self, response.job)

    async def extend(self, job_id: str, num_samples: int, **options: Any) -> AsyncJob:
        """Queues a job that continues `job_id`: see `Client.extend`."""
        response = await self._call(self._stub.SubmitJob, _extend_request(job_id, num_samples, **options))
        return AsyncJob(self, response.job)

    async def get(self, job_id: str) -> AsyncJob:
        return AsyncJob(self, (await self._call(self._stub.GetJob, pb.GetJobRequest(job_id=job_id))).job)

    async def cancel(self, job_id: str) -> AsyncJob:
        return AsyncJob(self, (await self._call(self._stub.CancelJob, pb.CancelJobRequest(job_id=job_id))).job)

    async def delete(self, job_id: str) -> int:
        """Deletes a job and its objects: see `Client.delete`."""
        return (await self._call(self._stub.DeleteJob, pb.DeleteJobRequest(job_id=job_id))).objects_deleted

    async def retry(self, job_id: str) -> AsyncJob:
        return AsyncJob(self, (await self._call(self._stub.RetryJob, pb.RetryJobRequest(job_id=job_id))).job)

    async def models(self) -> list[Model]:
        return [Model(m) for m in (await self._call(self._stub.ListModels, pb.ListModelsRequest())).models]

    async def model(self, name: str) -> Model:
        return Model((await self._call(self._stub.GetModel, pb.GetModelRequest(name=name))).model)

    async def list(
        self,
        states: Sequence[str] = (),
        labels: Optional[Mapping[str, str]] = None,
        limit: Optional[int] = None,
        page_size: int = 100,
    ) -> AsyncIterator[AsyncJob]:
        """Jobs, newest first, fetched a page at a time."""
        token, seen = "", 0
        while True:
            page = await self._call(self._stub.ListJobs, _list_request(states, labels, page_size, token))
            for message in page.jobs:
                if limit is not None and seen >= limit:
                    return
                seen += 1
                yield AsyncJob(self, message)
            token = page.next_page_token
            if not token:
                return

    async def _watch(self, job_id: str, reconnect_seconds: float, timeout: Optional[float]) -> AsyncIterator[pb.Job]:
        follow = _Follow(job_id, reconnect_seconds, timeout)
        while True:
            try:
                stream = self._stub.WatchJob(
                    pb.WatchJobRequest(job_id=job_id), metadata=self._metadata, timeout=follow.remaining()
                )
                async for event in stream:
                    yield follow.seen(event.job)
                return
            except grpc.aio.AioRpcError as e:
                pause = follow.failed(e)
                if pause is None:
                    return
                await asyncio.sleep(pause)
