"""Cancel a request's work when its client disconnects.

Starlette runs a non-streaming handler to completion even if the client has
gone; generation is the expensive part, so the handler is cancelled instead
(which cancels in-process generation and closes connections to vLLM workers,
making them abort). Streams are cancelled by the SSE response itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from starlette.requests import Request

from server.errors import ClientDisconnectedError

T = TypeVar("T")


async def cancel_on_disconnect(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Runs ``work``; if the client disconnects first, cancels it and raises ``ClientDisconnectedError``."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise ClientDisconnectedError()
    return task.result()


async def _wait_for_disconnect(request: Request) -> None:
    # The body has been read, so the next message can only be the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass
