"""Per-request context: request id, access log and metrics, for plain and streaming responses."""

from __future__ import annotations

import logging
import time
import uuid

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from models.errors import RequestTooLargeError
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
        started = time.perf_counter()
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


class BodySizeLimitMiddleware:
    """Refuses a body over ``max_bytes`` with a 413: at once when its ``Content-Length`` says so, else once
    more than that has arrived (a chunked body), before any of it is parsed. A body within the bound is read
    here, as the framework would read it anyway, and handed on whole."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "DELETE"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        body, message = bytearray(), await receive()
        while message["type"] == "http.request":
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
            message = await receive()
        whole: Message = {"type": "http.request", "body": bytes(body), "more_body": False}
        pending = [whole if message["type"] == "http.request" else message]

        async def replay() -> Message:
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = RequestTooLargeError(f"The request body is larger than this server reads ({self.max_bytes} bytes).")
        await JSONResponse(error_payload(error), status_code=error.status_code)(scope, receive, send)
