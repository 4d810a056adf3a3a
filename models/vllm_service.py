"""One model on vLLM workers: its replicas (remote or managed), health watching, and its calls.

Transport and the translation of worker errors live in ``models.worker_http``.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import AsyncGenerator
from contextlib import suppress
from pathlib import Path
from typing import Any

from models.replicas import ReplicaSet, affinity_key
from models.worker_http import WorkerHTTP
from models.workers import ManagedWorker, Supervision, WorkerSpec

logger = logging.getLogger(__name__)


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
        health_timeout_s: float = 5.0,
        health_failures: int = 3,
        connect_timeout_s: float = 3.0,
        request_timeout_s: float = 600.0,
        session_header: str | None = None,
        workers: list[ManagedWorker] | None = None,
        http: WorkerHTTP | None = None,
    ) -> None:
        self.name = name
        self.http = http or WorkerHTTP(connect_timeout_s=connect_timeout_s, read_timeout_s=request_timeout_s,
                                       session_header=session_header)  # fmt: skip
        self.replicas = ReplicaSet(name, urls, self.http.probe, failures_to_mark_down=health_failures)
        self.workers = workers or []
        self._health_interval_s = health_interval_s
        self._health_timeout_s = health_timeout_s
        self._watch: asyncio.Task[None] | None = None

    @classmethod
    async def connect(cls, name: str, urls: list[str], **options: Any) -> VLLMService:
        """Existing replicas; at least one must answer ``/health`` now."""
        service = cls(name, urls, **options)
        await service.replicas.check(timeout=service._health_timeout_s)
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
        http = WorkerHTTP(connect_timeout_s=options.get("connect_timeout_s", 3.0),
                          read_timeout_s=options.get("request_timeout_s", 600.0),
                          session_header=options.get("session_header"))  # fmt: skip
        directory = log_dir or Path(tempfile.mkdtemp(prefix="alignd-workers-"))
        workers = [ManagedWorker(spec, index, directory, http.probe, supervision) for index in range(replicas)]
        service = cls(spec.name, [worker.url for worker in workers], workers=workers, http=http, **options)
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
            self.replicas.watch(self._health_interval_s, self._health_timeout_s), name=f"health-{self.name}"
        )

    async def get_json(self, path: str) -> Any:
        return await self.replicas.call(lambda replica: self.http.get_json(f"{replica.url}{path}"))

    async def post_json(self, path: str, body: dict[str, Any], *, affinity: str | None = None) -> Any:
        """POSTs ``body`` to one replica (failing over once if it is unreachable); ``affinity``
        overrides the request's replica affinity."""
        session = affinity_key(affinity)
        return await self.replicas.call(
            lambda replica: self.http.post_json(f"{replica.url}{path}", body, session=session), affinity=affinity
        )

    def stream_json(
        self, path: str, body: dict[str, Any], *, affinity: str | None = None
    ) -> AsyncGenerator[dict[str, Any], None]:
        """POSTs ``body`` and yields each SSE ``data`` object until ``[DONE]``.

        Closing the generator closes the connection, which makes vLLM abort the request.
        """
        session = affinity_key(affinity)
        return self.replicas.stream(
            lambda replica: self.http.stream_json(f"{replica.url}{path}", body, session=session), affinity=affinity
        )

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with suppress(asyncio.CancelledError):
                await self._watch
        await asyncio.gather(*(worker.stop() for worker in self.workers))
        await self.http.close()

    def describe(self) -> list[dict[str, object]]:
        pids = {worker.url: worker.pid for worker in self.workers}
        return [{**replica, "pid": pids.get(str(replica["url"]))} for replica in self.replicas.describe()]
