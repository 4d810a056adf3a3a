"""Graceful drain on SIGTERM: refuse new work, let what is in flight finish, then stop.

The first SIGTERM (what Kubernetes, docker and systemd send) starts a drain of at most ``drain_timeout_s``:
new requests get a 503 ``shutting_down`` at once and ``/ready`` fails, so a load balancer moves them to
another replica, while requests in flight (streams included) go on. Once none is left, or the timeout has
passed, the signal is handed to the server as if it had just arrived: uvicorn stops accepting, cancels
what remains after a short grace, and the app's shutdown stops the managed workers. A second SIGTERM
stops at once. ``/health`` and ``/metrics`` keep answering throughout.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from models.errors import EngineUnavailableError
from server.errors import error_payload

logger = logging.getLogger(__name__)

# Answered while draining: the probes, and what an operator watches the drain with.
ALWAYS_OPEN = frozenset(("/health", "/ready", "/metrics"))


class ShuttingDownError(EngineUnavailableError):
    """The gateway is draining before it stops: another replica (or this one, restarted) takes the request."""

    code = "shutting_down"

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class Drain:
    """What is in flight, and whether a drain has begun. ``install`` takes SIGTERM from the server."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None

    def install(self) -> None:
        """Takes over SIGTERM (where signals can be handled: the main thread of a server process)."""
        if threading.current_thread() is not threading.main_thread():
            return
        loop = asyncio.get_running_loop()
        previous = signal.getsignal(signal.SIGTERM)

        def handle(signum: int, frame: FrameType | None) -> None:
            if self.draining:  # a second SIGTERM: stop now
                _hand_over(signum, previous)
                return
            self.draining = True
            loop.call_soon_threadsafe(self._start, lambda: _hand_over(signum, previous))

        signal.signal(signal.SIGTERM, handle)

    def _start(self, stop: Callable[[], None]) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(stop))

    async def _run(self, stop: Callable[[], None]) -> None:
        logger.info("draining", extra={"in_flight": self.in_flight, "timeout_s": self.timeout_s})
        try:
            await asyncio.wait_for(self._idle.wait(), self.timeout_s)
        except TimeoutError:
            logger.warning("drain timed out; stopping with requests in flight", extra={"in_flight": self.in_flight})
        stop()

    def enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()


def _hand_over(signum: int, previous: signal.Handlers | object) -> None:
    """Gives the signal to whoever had it before (the server), as if it had only now arrived."""
    signal.signal(signum, previous)  # type: ignore[arg-type]
    signal.raise_signal(signum)


class DrainMiddleware:
    """Counts the requests in flight for the drain; while it lasts, a new request is a 503."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in ALWAYS_OPEN:
            await self.app(scope, receive, send)
            return
        if self.drain.draining:
            error = ShuttingDownError("The server is shutting down; retry the request (another replica takes it).")
            await JSONResponse(error_payload(error), error.status_code, headers=error.headers)(scope, receive, send)
            return
        self.drain.enter()
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.leave()
