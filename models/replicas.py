"""Replicas of one model: health, load, per-request affinity, failover.

Every engine call of one client request goes to the same replica (so vLLM's
prefix cache is hit): the server sets ``request_affinity`` for the request
and the first call binds that key to the least-loaded healthy replica.
A call's own ``affinity`` (an ASAp trie's key, which outlives requests) picks
its replica by rendezvous hashing over the healthy replicas instead: every
gateway process, given the same replicas, sends the key to the same one.
Calls without a key go to the least-loaded healthy replica. A background
task checks ``/health`` of every replica; a replica that fails
``failures_to_mark_down`` checks in a row, or a connection, is taken out
until a check succeeds again. A replica taken out only because its checks
answered late is alive but busy (a CPU worker starved by its neighbours): when
no replica is healthy, calls go to such replicas rather than fail at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import OrderedDict
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from contextlib import aclosing, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TypeVar

from opentelemetry import trace

from models.errors import EngineUnavailableError

logger = logging.getLogger(__name__)

T = TypeVar("T")

request_affinity: ContextVar[str | None] = ContextVar("request_affinity", default=None)
"""The key whose engine calls share a replica; the server sets it to the request id."""

_MAX_BINDINGS = 10_000


@dataclass(frozen=True, slots=True)
class HealthProblem:
    reason: str
    late: bool = False
    """The check timed out: the replica may be alive and busy, not dead."""


HealthProbe = Callable[[str, float], Awaitable[HealthProblem | None]]
"""``probe(url, timeout)``: None if ``url`` answers healthy within ``timeout``, else what went wrong."""


def affinity_key(affinity: str | None = None) -> str | None:
    """The key a call's replica is chosen by: its own ``affinity``, else the request's."""
    return affinity or request_affinity.get()


def _rendezvous_weight(key: str, replica: Replica) -> bytes:
    return hashlib.blake2b(f"{key}\x00{replica.url}".encode(), digest_size=8).digest()


class ReplicaUnreachableError(Exception):
    """A replica could not be reached or died mid-call (connection refused, reset, timed out)."""


@dataclass(slots=True, eq=False)
class Replica:
    url: str
    healthy: bool = False
    in_flight: int = 0
    failed_checks: int = 0
    late: bool = False
    """Out only because its health checks answered late: a last resort when no replica is healthy."""

    @contextmanager
    def busy(self) -> Iterator[None]:
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1


class ReplicaSet:
    """The replicas serving one model, and the choice of one for each call.

    Args:
        name: the model name, for messages.
        urls: base URLs of the replicas (``http://host:port``).
        probe: checks one replica's ``/health``.
        failures_to_mark_down: consecutive failed checks that take a healthy replica out; a busy
            worker that answers one check late keeps serving.
    """

    def __init__(self, name: str, urls: list[str], probe: HealthProbe, *, failures_to_mark_down: int = 3) -> None:
        if not urls:
            raise ValueError(f"`{name}` needs at least one replica URL")
        self.name = name
        self.replicas = [Replica(url) for url in urls]
        self._probe = probe
        self._failures_to_mark_down = failures_to_mark_down
        self._bindings: OrderedDict[str, Replica] = OrderedDict()

    def pick(self, key: str | None = None, *, exclude: Replica | None = None, stable: bool = False) -> Replica:
        """The replica for a call with affinity ``key`` (None: the least-loaded healthy one); a ``stable``
        key's by rendezvous hashing, the same in every process."""
        candidates = self._candidates(exclude)
        if key is not None and stable:
            return max(candidates, key=lambda replica: _rendezvous_weight(key, replica))
        if key is not None:
            bound = self._bindings.get(key)
            if bound is not None and bound in candidates:
                self._bindings.move_to_end(key)
                return bound
        chosen = min(candidates, key=lambda replica: replica.in_flight)
        if key is not None:
            self._bind(key, chosen)
        return chosen

    async def call(
        self, operation: Callable[[Replica], Awaitable[T]], *, idempotent: bool = True, affinity: str | None = None
    ) -> T:
        """Runs ``operation`` on the chosen replica (``affinity``, else the request's); an idempotent
        call that cannot reach it is retried once on another replica."""
        key, stable = affinity_key(affinity), affinity is not None
        replica = self.pick(key, stable=stable)
        for attempt in range(2):
            try:
                with replica.busy():
                    trace.get_current_span().set_attribute("alignd.replica", replica.url)
                    return await operation(replica)
            except ReplicaUnreachableError as exc:
                replica = self._after_failure(key, replica, exc, retry=idempotent and attempt == 0, stable=stable)
        raise AssertionError("unreachable: the second failure raises")

    async def stream(
        self, operation: Callable[[Replica], AsyncGenerator[T, None]], *, affinity: str | None = None
    ) -> AsyncGenerator[T, None]:
        """Streams ``operation`` from the chosen replica (``affinity``, else the request's); retried
        once on another replica only if the first failed before it produced anything."""
        key, stable = affinity_key(affinity), affinity is not None
        replica = self.pick(key, stable=stable)
        for attempt in range(2):
            produced = False
            try:
                with replica.busy():
                    trace.get_current_span().set_attribute("alignd.replica", replica.url)
                    async with aclosing(operation(replica)) as items:
                        async for item in items:
                            produced = True
                            yield item
                return
            except ReplicaUnreachableError as exc:
                replica = self._after_failure(key, replica, exc, retry=not produced and attempt == 0, stable=stable)

    def _candidates(self, exclude: Replica | None) -> list[Replica]:
        """The healthy replicas; with none, those out only for answering their checks late."""
        healthy = [replica for replica in self.replicas if replica.healthy and replica is not exclude]
        if healthy:
            return healthy
        late = [replica for replica in self.replicas if replica.late and replica is not exclude]
        if not late:
            raise EngineUnavailableError(f"No healthy replica of `{self.name}` is available; retry shortly.")
        return late

    def _after_failure(
        self, key: str | None, replica: Replica, exc: Exception, *, retry: bool, stable: bool
    ) -> Replica:
        self.mark_down(replica, exc)
        if not retry:
            raise EngineUnavailableError(f"A replica of `{self.name}` failed while serving this request.") from exc
        other = self.pick(key, exclude=replica, stable=stable)
        logger.info("call retried on another replica", extra={"model": self.name, "failed": replica.url,
                                                              "retried_on": other.url})  # fmt: skip
        return other

    def mark_down(self, replica: Replica, reason: object, *, late: bool = False) -> None:
        """Takes ``replica`` out; ``late``: only its health checks answered late (it is kept as a last resort)."""
        if replica.healthy:
            logger.warning("replica down", extra={"model": self.name, "url": replica.url, "reason": str(reason),
                                                  "late": late})  # fmt: skip
        replica.healthy, replica.late = False, late

    async def check(self, timeout: float) -> None:
        """One round of health checks over every replica."""
        await asyncio.gather(*(self._check_one(replica, timeout) for replica in self.replicas))

    async def watch(self, interval: float, timeout: float) -> None:
        """Health checks forever, every ``interval`` seconds (run as a background task)."""
        while True:
            await self.check(timeout)
            await asyncio.sleep(interval)

    async def _check_one(self, replica: Replica, timeout: float) -> None:
        problem = await self._probe(f"{replica.url}/health", timeout)
        if problem is not None:
            replica.failed_checks += 1
            if replica.failed_checks >= self._failures_to_mark_down or not replica.healthy:
                self.mark_down(replica, problem.reason, late=problem.late)
            return
        replica.failed_checks = 0
        if not replica.healthy:
            logger.info("replica up", extra={"model": self.name, "url": replica.url})
            replica.healthy, replica.late = True, False

    def _bind(self, key: str, replica: Replica) -> None:
        self._bindings[key] = replica
        self._bindings.move_to_end(key)
        while len(self._bindings) > _MAX_BINDINGS:
            self._bindings.popitem(last=False)

    def describe(self) -> list[dict[str, object]]:
        return [{"url": r.url, "healthy": r.healthy, "in_flight": r.in_flight} for r in self.replicas]


@contextmanager
def affinity(key: str | None) -> Iterator[None]:
    """Engine calls made inside share a replica per model."""
    token = request_affinity.set(key)
    try:
        yield
    finally:
        request_affinity.reset(token)
