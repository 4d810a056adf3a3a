"""HTTP to vLLM workers: one pooled aiohttp session, JSON and SSE calls, and every transport error translated.

aiohttp rather than httpx: under streaming load the client to the workers was the gateway's largest cost
(httpx parses HTTP/1.1 in pure Python and scans its connection pool on every request; aiohttp parses in C
and keeps idle connections per host). Error translation, in one place: unreachable or dead replica ->
``ReplicaUnreachableError`` (failover / 503); worker 4xx -> 400 with vLLM's message; worker 5xx -> 502;
a worker silent for longer than the read timeout, a body cut short, a stream without its end marker, or
what is not JSON -> 502.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Iterator
from contextlib import contextmanager
from typing import Any

import aiohttp
import orjson
from opentelemetry import propagate

from models.errors import AligndError, InvalidRequestError, UpstreamError
from models.replicas import HealthProblem, ReplicaUnreachableError

# Idle connections are dropped before vLLM's own keep-alive (uvicorn's default, 5 s) closes them, so a
# request never races the worker's close on a connection the pool still thinks open.
KEEPALIVE_S = 4.0
_JSON = {"content-type": "application/json"}
_DONE = b"[DONE]"


class WorkerHTTP:
    """The gateway's HTTP client for one model's workers; create it on the running event loop.

    Args:
        connect_timeout_s: to open a connection (longer: the replica is unreachable).
        read_timeout_s: between two reads of a response (longer: the worker is stuck); a stream may last
            as long as its tokens keep coming.
        session_header: sent with a call's affinity key (``session``), so that a router in front of the
            workers keeps one request's calls on one of them; None: not sent.
    """

    def __init__(
        self, *, connect_timeout_s: float = 3.0, read_timeout_s: float = 600.0, session_header: str | None = None
    ) -> None:
        self._session_header = session_header
        # No cap on connections: admission control bounds the requests in flight.
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_S)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s, sock_read=read_timeout_s)
        self._session = aiohttp.ClientSession(connector=connector, timeout=timeout)

    async def probe(self, url: str, timeout: float) -> HealthProblem | None:
        """None if ``GET url`` answers 200 within ``timeout``, else what went wrong (``late``: no answer in time,
        as from a worker too busy to answer, rather than a refusal or an error)."""
        try:
            async with self._session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as response:
                await response.read()
                return None if response.status == 200 else HealthProblem(f"{url} answered {response.status}")
        except TimeoutError as exc:
            return HealthProblem(repr(exc), late=True)
        except aiohttp.ClientError as exc:
            return HealthProblem(repr(exc))

    async def get_json(self, url: str) -> Any:
        with _translated(url):
            async with self._session.get(url) as response:
                return _checked(response.status, await response.read())

    async def post_json(self, url: str, body: dict[str, Any], *, session: str | None = None) -> Any:
        with _translated(url):
            async with self._session.post(url, data=orjson.dumps(body), headers=self._headers(session)) as response:
                return _checked(response.status, await response.read())

    async def stream_json(
        self, url: str, body: dict[str, Any], *, session: str | None = None
    ) -> AsyncGenerator[dict[str, Any], None]:
        """POSTs ``body`` and yields each SSE ``data`` object before ``[DONE]``, parsed once.

        The body is read to its end, so the connection goes back to the pool; closing the generator early
        closes the connection instead, which makes vLLM abort the request.
        """
        with _translated(url):
            async with self._session.post(url, data=orjson.dumps(body), headers=self._headers(session)) as response:
                if response.status != 200:
                    _checked(response.status, await response.read())
                done = False
                async for data in _sse_data(response.content):
                    if done or data == _DONE:
                        done = True
                        continue
                    event = _event(data)
                    if "error" in event:
                        raise _error_from(event, status=500)
                    yield event
                if not done:
                    raise UpstreamError(f"The worker at {url} ended its stream before the end marker ([DONE]).")

    async def close(self) -> None:
        await self._session.close()

    def _headers(self, session: str | None) -> dict[str, str]:
        """JSON, the session header, and the trace context (W3C ``traceparent``: vLLM continues the trace)."""
        headers = dict(_JSON)
        if session is not None and self._session_header is not None:
            headers[self._session_header] = session
        propagate.inject(headers)
        return headers


async def _sse_data(content: aiohttp.StreamReader) -> AsyncGenerator[bytes, None]:
    """The ``data`` of each server-sent event (its data lines joined), per the SSE format; vLLM sends nothing
    else, so other fields and comments are skipped. Reads whatever has arrived and splits it into events,
    rather than a line at a time: two reads per event were a tenth of the gateway's time under streaming."""
    pending = b""
    async for received in content.iter_any():
        pending += received.replace(b"\r\n", b"\n") if b"\r" in received else received
        *events, pending = pending.split(b"\n\n")
        for event in events:
            data = _event_data(event)
            if data is not None:
                yield data
    data = _event_data(pending)
    if data is not None:
        yield data


def _event_data(event: bytes) -> bytes | None:
    if event.startswith(b"data: ") and b"\n" not in event:  # what vLLM sends
        return event[6:]
    lines = [line[6:] if line[5:6] == b" " else line[5:] for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


@contextmanager
def _translated(url: str) -> Iterator[None]:
    """Maps transport failures of one worker call onto alignd's errors."""
    try:
        yield
    except (AligndError, ReplicaUnreachableError):
        raise
    except aiohttp.ConnectionTimeoutError as exc:
        raise ReplicaUnreachableError(f"{url}: connecting timed out") from exc
    except (aiohttp.SocketTimeoutError, TimeoutError) as exc:
        raise UpstreamError(f"The worker at {url} timed out.") from exc
    except aiohttp.ClientConnectionError as exc:
        # Refused, reset, or closed mid-response: the replica is gone, not the request.
        raise ReplicaUnreachableError(f"{url}: {exc!r}") from exc
    except aiohttp.ClientError as exc:
        raise UpstreamError(f"The worker at {url} failed: {exc!r}") from exc


def _event(data: bytes) -> dict[str, Any]:
    try:
        event = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise UpstreamError("The model worker streamed an event that is not JSON.") from exc
    if not isinstance(event, dict):
        raise UpstreamError("The model worker streamed an event that is not a JSON object.")
    return event


def _checked(status: int, body: bytes) -> Any:
    """The JSON of a successful response; a worker error as alignd's."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if status < 400:
            raise UpstreamError("The model worker answered with something that is not JSON.") from exc
        data = {"error": {"message": body[:500].decode(errors="replace")}}
    if status < 400:
        return data
    raise _error_from(data, status=status)


def _error_from(data: Any, *, status: int) -> AligndError:
    """vLLM's error object (``{"error": {...}}``, or FastAPI's ``{"detail": ...}``); anything else as text."""
    error = data.get("error", data) if isinstance(data, dict) else data
    fields = error if isinstance(error, dict) else {}
    message = str(fields.get("message") or fields.get("detail") or error)[:500]
    if 400 <= status < 500:
        param = fields.get("param")
        return InvalidRequestError(
            f"The model worker rejected the request: {message}", param=param if isinstance(param, str) else None
        )
    return UpstreamError(f"The model worker failed: {message}")
