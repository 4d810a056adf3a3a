"""One model on vLLM workers: its replicas (remote or managed), health watching, HTTP calls.

All HTTP errors from workers are translated into alignd errors here, in one place:
unreachable or dead replica -> failover / 503; worker 4xx -> 400 with vLLM's
message; worker 5xx -> 502; timeout -> 502.
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
from collections.abc import AsyncGenerator, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import aconnect_sse

from models.errors import AligndError, InvalidRequestError, UpstreamError
from models.replicas import Replica, ReplicaSet, ReplicaUnreachableError
from models.workers import ManagedWorker, Supervision, WorkerSpec

logger = logging.getLogger(__name__)

# A connection that never opened, or broke under us: the replica is gone, not the request.
_UNREACHABLE = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


class VLLMService:
    """The replicas of one vLLM-served model and the calls made to them.

    Build with ``connect`` (existing URLs) or ``launch`` (managed workers);
    ``close`` stops health checks and managed workers.
    """

    def __init__(
        self,
        name: str,
        urls: list[str],
        *,
        health_interval_s: float = 2.0,
        connect_timeout_s: float = 3.0,
        request_timeout_s: float = 600.0,
        workers: list[ManagedWorker] | None = None,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.name = name
        self._client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(request_timeout_s, connect=connect_timeout_s),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        )
        self.replicas = ReplicaSet(name, urls, self._client)
        self.workers = workers or []
        self._health_interval_s = health_interval_s
        self._connect_timeout_s = connect_timeout_s
        self._watch: asyncio.Task[None] | None = None

    @classmethod
    async def connect(cls, name: str, urls: list[str], **options: Any) -> VLLMService:
        """Existing replicas; at least one must answer ``/health`` now."""
        service = cls(name, urls, **options)
        await service.replicas.check(timeout=service._connect_timeout_s)
        if not any(replica.healthy for replica in service.replicas.replicas):
            await service.close()
            raise RuntimeError(f"no replica of `{name}` is healthy: {', '.join(urls)}")
        service.start_watching()
        return service

    @classmethod
    async def launch(
        cls,
        spec: WorkerSpec,
        replicas: int,
        *,
        supervision: Supervision,
        log_dir: Path | None = None,
        **options: Any,
    ) -> VLLMService:
        """Launches ``replicas`` managed workers and waits until all are healthy."""
        client = httpx.AsyncClient(timeout=httpx.Timeout(options.get("request_timeout_s", 600.0), connect=3.0))
        directory = log_dir or Path(tempfile.mkdtemp(prefix="alignd-workers-"))
        workers = [ManagedWorker(spec, index, directory, client, supervision) for index in range(replicas)]
        service = cls(spec.name, [worker.url for worker in workers], workers=workers, client=client, **options)
        try:
            await asyncio.gather(*(worker.start() for worker in workers))
        except BaseException:
            await service.close()
            raise
        await service.replicas.check(timeout=supervision.health_timeout_s)
        service.start_watching()
        return service

    def start_watching(self) -> None:
        self._watch = asyncio.create_task(
            self.replicas.watch(self._health_interval_s, self._connect_timeout_s), name=f"health-{self.name}"
        )

    async def get_json(self, path: str) -> Any:
        async def send(replica: Replica) -> Any:
            with _translated(replica):
                response = await self._client.get(f"{replica.url}{path}")
            return _checked(response).json()

        return await self.replicas.call(send)

    async def post_json(self, path: str, body: dict[str, Any], *, affinity: str | None = None) -> Any:
        """POSTs ``body`` to one replica (failing over once if it is unreachable); ``affinity``
        overrides the request's replica affinity."""

        async def send(replica: Replica) -> Any:
            with _translated(replica):
                response = await self._client.post(f"{replica.url}{path}", json=body)
            return _checked(response).json()

        return await self.replicas.call(send, affinity=affinity)

    def stream_json(
        self, path: str, body: dict[str, Any], *, affinity: str | None = None
    ) -> AsyncGenerator[dict[str, Any], None]:
        """POSTs ``body`` and yields each SSE ``data`` object until ``[DONE]``.

        Closing the generator closes the connection, which makes vLLM abort the request.
        """

        async def events(replica: Replica) -> AsyncGenerator[dict[str, Any], None]:
            with _translated(replica):
                async with aconnect_sse(self._client, "POST", f"{replica.url}{path}", json=body) as source:
                    if source.response.status_code != 200:
                        await source.response.aread()
                        _checked(source.response)
                    async for event in source.aiter_sse():
                        if event.data == "[DONE]":
                            return
                        data = json.loads(event.data)
                        if "error" in data:
                            raise _error_from(data, status=500)
                        yield data

        return self.replicas.stream(events, affinity=affinity)

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with suppress(asyncio.CancelledError):
                await self._watch
        await asyncio.gather(*(worker.stop() for worker in self.workers))
        await self._client.aclose()

    def describe(self) -> list[dict[str, object]]:
        pids = {worker.url: worker.pid for worker in self.workers}
        return [{**replica, "pid": pids.get(str(replica["url"]))} for replica in self.replicas.describe()]


@contextmanager
def _translated(replica: Replica) -> Iterator[None]:
    """Maps transport failures of one replica call onto alignd's errors."""
    try:
        yield
    except (AligndError, ReplicaUnreachableError):
        raise
    except _UNREACHABLE as exc:
        raise ReplicaUnreachableError(f"{replica.url}: {exc!r}") from exc
    except httpx.TimeoutException as exc:
        raise UpstreamError(f"The worker at {replica.url} timed out.") from exc
    except httpx.HTTPError as exc:
        raise UpstreamError(f"The worker at {replica.url} failed: {exc!r}") from exc


def _checked(response: httpx.Response) -> httpx.Response:
    if response.status_code < 400:
        return response
    try:
        data = response.json()
    except ValueError:
        data = {"error": {"message": response.text[:500]}}
    raise _error_from(data, status=response.status_code)


def _error_from(data: dict[str, Any], *, status: int) -> AligndError:
    error = data.get("error", data)
    message = str(error.get("message") or error.get("detail") or error)
    if 400 <= status < 500:
        param = error.get("param")
        return InvalidRequestError(f"The model worker rejected the request: {message}", param=param)
    return UpstreamError(f"The model worker failed: {message}")
