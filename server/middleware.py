"""Per-request context: request id, access log and metrics, for plain and streaming responses."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from models.errors import AligndError, RequestTimeoutError, RequestTooLargeError
from models.replicas import request_affinity
from server.errors import as_aligned_error, error_payload
from server.logs import request_id
from server.metrics import Metrics

logger = logging.getLogger("alignd.access")

REQUEST_ID_HEADER = "x-request-id"
# Metric labels use these paths; anything else is "other", so clients cannot grow the label set.
KNOWN_ROUTES = frozenset(("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/ready", "/metrics"))


class RequestContextMiddleware:
    """Pure ASGI middleware, so timing covers a stream until its last byte."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        rid = headers.get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1")[:128] or uuid.uuid4().hex
        token = request_id.set(rid)
        # Every engine call this request makes goes to the same replica of a model.
        affinity_token = request_affinity.set(rid)
        state = scope.setdefault("state", {})
        route = scope["path"] if scope["path"] in KNOWN_ROUTES else "other"
        started = state["started_s"] = time.perf_counter()  # the time to first token counts from here
        status = 500
        status_started = False

        async def send_with_context(message: Message) -> None:
            nonlocal status, status_started
            if message["type"] == "http.response.start":
                status, status_started = message["status"], True
                message.setdefault("headers", []).append((REQUEST_ID_HEADER.encode(), rid.encode("latin-1")))
            await send(message)

        self.metrics.in_flight.labels(route=route).inc()
        try:
            await self.app(scope, receive, send_with_context)
        except Exception as exc:
            # What no handler caught is logged here, once, with its request id (Starlette's outermost layer
            # would log it after the id is gone, and the server again); the client gets a 500 if it can.
            if status_started:
                logger.error("unexpected error after the response started", exc_info=exc)
                return
            error = as_aligned_error(exc)
            state["error_type"] = error.error_type
            response = JSONResponse(error_payload(error), status_code=error.status_code)
            await response(scope, receive, send_with_context)
        finally:
            self.metrics.in_flight.labels(route=route).dec()
            self._record(route, state, status, time.perf_counter() - started, scope)
            request_affinity.reset(affinity_token)
            request_id.reset(token)

    def _record(self, route: str, state: dict, status: int, seconds: float, scope: Scope) -> None:
        model = state.get("model", "")
        self.metrics.requests.labels(route=route, model=model, status=str(status)).inc()
        self.metrics.latency.labels(route=route, model=model).observe(seconds)
        if status >= 400:
            self.metrics.errors.labels(route=route, model=model, type=state.get("error_type", "unknown")).inc()
        logger.info(
            "request",
            extra={
                "method": scope["method"], "path": scope["path"], "status": status,
                "duration_ms": round(seconds * 1000, 1), "model": model or None,
            },
        )  # fmt: skip


class BodyLimitsMiddleware:
    """Bounds a request body in size and in time, before any of it is parsed. A body over ``max_bytes`` is a
    413: at once when its ``Content-Length`` says so, else once more than that has arrived (a chunked body).
    A body still arriving ``read_timeout_s`` after its head is a 408 (a client trickling bytes holds a
    connection and a request's memory). A body within both bounds is read here, as the framework would read
    it anyway, and handed on whole."""

    def __init__(self, app: ASGIApp, max_bytes: int, read_timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout_s = read_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "DELETE"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(self._too_large(), scope, receive, send)
            return
        try:
            async with asyncio.timeout(self.read_timeout_s):
                body, message = await self._read(receive)
        except TimeoutError:
            error = RequestTimeoutError(f"The request body did not arrive within {self.read_timeout_s:g} s.")
            await self._refuse(error, scope, receive, send)
            return
        except RequestTooLargeError as exc:
            await self._refuse(exc, scope, receive, send)
            return
        whole: Message = {"type": "http.request", "body": body, "more_body": False}
        pending = [whole if message["type"] == "http.request" else message]

        async def replay() -> Message:
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)

    async def _read(self, receive: Receive) -> tuple[bytes, Message]:
        """The body and the last message received (a disconnect, when the client left half way)."""
        body, message = bytearray(), await receive()
        while message["type"] == "http.request":
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                raise self._too_large()
            if not message.get("more_body", False):
                break
            message = await receive()
        return bytes(body), message

    def _too_large(self) -> RequestTooLargeError:
        return RequestTooLargeError(f"The request body is larger than this server reads ({self.max_bytes} bytes).")

    @staticmethod
    async def _refuse(error: AligndError, scope: Scope, receive: Receive, send: Send) -> None:
        # The rest of the body is never read: the connection cannot carry another request.
        response = JSONResponse(error_payload(error), status_code=error.status_code, headers={"connection": "close"})
        await response(scope, receive, send)
