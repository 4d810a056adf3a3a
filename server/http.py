"""uvicorn's HTTP protocol with a deadline on a request's head, against slow clients (slowloris).

uvicorn has no timeout on receiving a request: its keep-alive timer only runs between requests and
every byte received resets it, so a client sending a header byte a second holds a connection (and its
memory) for as long as it likes, and a connection that sends nothing is never closed. ASGI middleware
cannot help, since the application sees a request only once its head is parsed. This protocol gives
each connection ``read_timeout_s`` from when it opens, and each further request on it as long from its
first byte, to send a whole head; then it answers 408 and closes. The body's deadline is the
middleware's (``server.middleware.BodyLimitsMiddleware``), which can still answer with OpenAI error JSON.

uvicorn builds the protocol from an import string in every gateway process, so the deadline travels
in the environment (``READ_TIMEOUT_ENV``), set by ``alignd serve``.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from models.errors import RequestTimeoutError
from server.errors import error_payload

READ_TIMEOUT_ENV = "ALIGND_READ_TIMEOUT_S"
PROTOCOL = "server.http:HeadDeadlineProtocol"


def _timeout_response(timeout_s: float) -> bytes:
    error = RequestTimeoutError(f"The request's headers did not arrive within {timeout_s:g} s.")
    body = json.dumps(error_payload(error)).encode()
    head = (
        f"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class HeadDeadlineProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` that closes a connection whose request head is late, with a 408."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head_timeout_s = float(os.environ.get(READ_TIMEOUT_ENV, "30"))
        self.head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self.head_deadline = self.loop.call_later(self.head_timeout_s, self._head_too_late)

    def _disarm(self) -> None:
        if self.head_deadline is not None:
            self.head_deadline.cancel()
            self.head_deadline = None

    def _head_too_late(self) -> None:
        self.head_deadline = None
        if self.transport.is_closing():
            return
        # A previous request's response may still be streaming on this connection: then only close it.
        if self.cycle is None or self.cycle.response_complete:
            self.transport.write(_timeout_response(self.head_timeout_s))
        self.logger.warning("closed a connection whose request head did not arrive in %g s", self.head_timeout_s)
        self.transport.close()
