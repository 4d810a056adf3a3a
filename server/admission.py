"""Admission control: per served model, a bounded number of requests in flight and a bounded queue before them.

A request that finds the queue full is refused at once, and one that waits longer than ``queue_timeout_s`` is
refused then; both get 429 with a ``Retry-After`` estimated from recent service times. An overloaded gateway
therefore answers quickly instead of letting connections time out. A slot is held until the response's last
byte (streams included) and is freed however the request ends (see ``routes.admission_ticket``).

The bound is per gateway process and per base model: a profile counts against the model it runs on, and the
other models a method calls (a nudger, a reward model) are not counted separately.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import NoReturn

from models.errors import OverloadedError
from server.config import AdmissionConfig
from server.metrics import Metrics

# A client should come back within a minute even when the estimate is larger (`Settings.keep_alive_s` is
# longer, so its connection is still open then).
MAX_RETRY_AFTER_S = 60
# Weight of the newest service time in the running average that Retry-After is estimated from.
SERVICE_TIME_WEIGHT = 0.2


class _ModelGate:
    """One model's slots, the number of requests waiting for them, and how long a slot is usually held."""

    def __init__(self, max_in_flight: int) -> None:
        self.slots = asyncio.Semaphore(max_in_flight)
        self.max_in_flight = max_in_flight
        self.queued = 0
        self.service_s: float | None = None

    def record_service(self, seconds: float) -> None:
        previous = self.service_s
        self.service_s = seconds if previous is None else previous + SERVICE_TIME_WEIGHT * (seconds - previous)

    def retry_after_s(self) -> int:
        """When a newcomer would likely get a slot: the queue ahead of it, drained at the observed rate."""
        service = self.service_s if self.service_s is not None else 1.0
        return min(MAX_RETRY_AFTER_S, max(1, math.ceil(service * (self.queued + 1) / self.max_in_flight)))


class AdmissionController:
    """Hands out per-model slots to requests; refuses with ``OverloadedError`` (429) when over its bounds."""

    def __init__(self, config: AdmissionConfig, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self._gates: dict[str, _ModelGate] = {}
        limits = metrics.admission_limits
        limits.labels(limit="in_flight_per_model").set(config.max_in_flight_per_model)
        limits.labels(limit="queued_per_model").set(config.max_queued_per_model)
        limits.labels(limit="queue_timeout_seconds").set(config.queue_timeout_s)

    def ticket(self) -> AdmissionTicket:
        return AdmissionTicket(self)

    async def acquire(self, model: str) -> None:
        """Waits for a slot of ``model`` in FIFO order, or raises ``OverloadedError``."""
        gate = self._gates.setdefault(model, _ModelGate(self.config.max_in_flight_per_model))
        if gate.slots.locked() and gate.queued >= self.config.max_queued_per_model:
            self._refuse(model, gate, "queue_full", f"{gate.queued} requests are already waiting")
        started = time.perf_counter()
        gate.queued += 1
        self.metrics.admission_queued.labels(model=model).inc()
        try:
            async with asyncio.timeout(self.config.queue_timeout_s):
                await gate.slots.acquire()
        except TimeoutError:
            self._refuse(model, gate, "queue_timeout", f"no slot freed within {self.config.queue_timeout_s:g} s")
        finally:
            gate.queued -= 1
            self.metrics.admission_queued.labels(model=model).dec()
        self.metrics.admission_wait.labels(model=model).observe(time.perf_counter() - started)
        self.metrics.admission_in_flight.labels(model=model).inc()

    def release(self, model: str, held_s: float) -> None:
        gate = self._gates[model]
        gate.record_service(held_s)
        gate.slots.release()
        self.metrics.admission_in_flight.labels(model=model).dec()

    def _refuse(self, model: str, gate: _ModelGate, reason: str, why: str) -> NoReturn:
        self.metrics.admission_rejected.labels(model=model, reason=reason).inc()
        retry_after = gate.retry_after_s()
        raise OverloadedError(
            f"The model `{model}` is serving {gate.max_in_flight} requests and {why}; retry in {retry_after} s.",
            retry_after_s=retry_after,
        )


class AdmissionTicket:
    """One request's claim on at most one slot; the route releases it once the response is over."""

    def __init__(self, controller: AdmissionController) -> None:
        self._controller = controller
        self._held: tuple[str, float] | None = None

    async def admit(self, model: str) -> None:
        assert self._held is None, "a request takes one slot"
        await self._controller.acquire(model)
        self._held = (model, time.perf_counter())

    def release(self) -> None:
        if self._held is not None:
            model, since = self._held
            self._held = None
            self._controller.release(model, time.perf_counter() - since)
