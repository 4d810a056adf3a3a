"""Each API key's limits, counted where every gateway replica sees the same counts.

Requests and tokens per minute are sliding-window counters, the daily compute budget a fixed window, the
failed attempts of a client address a sliding window: all of the ``limits`` library, whose Redis storage
updates a counter and checks it in one Lua script (no read-modify-write races between replicas). Requests
in flight are a counter incremented and decremented in the same store. With ``state.url`` unset the
same counters live in this process, for a single gateway.

A store that cannot be reached fails closed by default (503 ``store_unavailable``) or, with
``auth.store_failure: open``, lets requests through unlimited, with a warning; either way the next request
tries the store again, so it recovers without a restart.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from limits import RateLimitItem, RateLimitItemPerDay, RateLimitItemPerMinute
from limits.aio.storage import Storage
from limits.aio.strategies import FixedWindowRateLimiter, SlidingWindowCounterRateLimiter
from limits.errors import StorageError
from limits.storage import storage_from_string
from limits.util import WindowStats

from models.errors import RateLimitExceededError, StoreUnavailableError
from server.config import ApiKeyConfig, AuthConfig, StateConfig

logger = logging.getLogger(__name__)

T = TypeVar("T")
Limiter = SlidingWindowCounterRateLimiter | FixedWindowRateLimiter
HEADER_KINDS = frozenset({"requests", "tokens"})
"""The limits OpenAI's ``x-ratelimit-*`` headers report."""

NAMESPACE = "alignd"
# A gateway that dies with requests in flight leaves them counted: the counter expires this long after it
# was created, and counts from zero again.
IN_FLIGHT_EXPIRY_S = 3600
# A store that does not answer within this is unreachable: the request fails closed (or open) instead of waiting.
STORE_TIMEOUT_S = 2.0


def storage_uri(state: StateConfig) -> str:
    """The ``limits`` storage for ``state.url``."""
    return f"async+{state.redis_url or 'memory://'}"


def async_storage(state: StateConfig) -> Storage:
    options: dict[str, float | str | bool] = {"wrap_exceptions": True}
    if state.url is not None:  # redis-py, the client alignd depends on (``limits`` defaults to coredis)
        options |= {"implementation": "redispy", "socket_timeout": STORE_TIMEOUT_S}
    storage = storage_from_string(storage_uri(state), **options)
    assert isinstance(storage, Storage)  # an ``async+`` URI gives an asyncio storage
    return storage


def reset_text(seconds: float) -> str:
    """A duration as OpenAI's ``x-ratelimit-reset-*`` headers write it: ``20ms``, ``1s``, ``6m0s``."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"


def refusal(stats: WindowStats | None, message: str) -> RateLimitExceededError:
    """A 429 that says when the window has room again (1 s when the store could not say)."""
    wait_s = 1 if stats is None else max(1, math.ceil(stats.reset_time - time.time()))
    return RateLimitExceededError(f"{message}; retry in {wait_s} s.", retry_after_s=wait_s)


@dataclass
class RateLimitHeaders:
    """OpenAI's ``x-ratelimit-*`` headers of one key, as far as its limits are known."""

    values: dict[str, str] = field(default_factory=dict)

    def add(self, kind: str, limit: int, remaining: int, reset_at: float) -> None:
        self.values |= {
            f"x-ratelimit-limit-{kind}": str(limit),
            f"x-ratelimit-remaining-{kind}": str(max(0, remaining)),
            f"x-ratelimit-reset-{kind}": reset_text(reset_at - time.time()),
        }


class Quotas:
    """The counters behind every key's limits; one per gateway process, over the configured store."""

    def __init__(self, auth: AuthConfig, state: StateConfig) -> None:
        self.auth = auth
        self.storage = async_storage(state)
        self.window = SlidingWindowCounterRateLimiter(self.storage)
        self.budget = FixedWindowRateLimiter(self.storage)
        self.failures = RateLimitItemPerMinute(auth.failed_attempts_per_minute)

    async def check_address(self, address: str) -> None:
        """429 for an address that sent too many bad keys this minute (brute force)."""
        identifiers = (NAMESPACE, "failures", address)
        allowed = await self._guarded(lambda: self.window.test(self.failures, *identifiers), True)
        if not allowed:
            stats = await self._guarded(lambda: self.window.get_window_stats(self.failures, *identifiers), None)
            raise refusal(stats, "Too many invalid API keys")

    async def count_failure(self, address: str) -> None:
        await self._guarded(lambda: self.window.hit(self.failures, NAMESPACE, "failures", address), True)

    async def admit(self, key: ApiKeyConfig, headers: RateLimitHeaders) -> None:
        """Counts one request against ``key``'s requests per minute; 429 when it is over."""
        if key.requests_per_minute is not None:
            await self._hit(self.window, RateLimitItemPerMinute(key.requests_per_minute), key, "requests", 1, headers)

    async def charge_tokens(self, key: ApiKeyConfig, tokens: int, headers: RateLimitHeaders) -> None:
        if key.tokens_per_minute is not None:
            await self._hit(self.window, RateLimitItemPerMinute(key.tokens_per_minute), key, "tokens", tokens, headers)

    async def charge_work(self, key: ApiKeyConfig, work: int, headers: RateLimitHeaders) -> None:
        if key.work_per_day is not None:
            await self._hit(self.budget, RateLimitItemPerDay(key.work_per_day), key, "work", work, headers)

    async def enter(self, key: ApiKeyConfig) -> bool:
        """Counts a request in flight; False (counting nothing) when ``key`` already has its cap."""
        if key.max_concurrent is None:
            return True
        counter = f"{NAMESPACE}/in-flight/{key.name}"
        count = await self._guarded(lambda: self.storage.incr(counter, IN_FLIGHT_EXPIRY_S), 0)
        if count > key.max_concurrent:
            await self.leave(key)
            return False
        return True

    async def leave(self, key: ApiKeyConfig) -> None:
        if key.max_concurrent is not None:
            counter = f"{NAMESPACE}/in-flight/{key.name}"
            await self._guarded(lambda: self.storage.incr(counter, IN_FLIGHT_EXPIRY_S, amount=-1), 0)

    async def _hit(
        self,
        limiter: Limiter,
        item: RateLimitItem,
        key: ApiKeyConfig,
        kind: str,
        cost: int,
        headers: RateLimitHeaders,
    ) -> None:
        """Counts ``cost`` against one of ``key``'s limits; 429 when it is over. The window is read back only
        for what tells it: the headers (requests, tokens) and a refusal's Retry-After."""
        identifiers = (NAMESPACE, key.name, kind)
        if cost > item.amount:
            stats = await self._guarded(lambda: limiter.get_window_stats(item, *identifiers), None)
            raise refusal(stats, f"The request's {kind} ({cost}) exceed the key's limit")
        allowed = await self._guarded(lambda: limiter.hit(item, *identifiers, cost=cost), True)
        if not allowed and isinstance(limiter, FixedWindowRateLimiter):  # it counts a refused hit too: take it back
            counter = item.key_for(*identifiers)
            await self._guarded(lambda: self.storage.incr(counter, item.get_expiry(), amount=-cost), 0)
        if kind not in HEADER_KINDS and allowed:
            return
        stats = await self._guarded(lambda: limiter.get_window_stats(item, *identifiers), None)
        if stats is not None and kind in HEADER_KINDS:
            headers.add(kind, item.amount, stats.remaining, stats.reset_time)
        if not allowed:
            raise refusal(stats, f"The key `{key.name}` is over its {kind} limit ({item})")

    async def _guarded(self, call: Callable[[], Awaitable[T]], when_open: T) -> T:
        """``call`` on the store; when the store fails, a 503 (closed) or ``when_open`` (open)."""
        try:
            return await call()
        except StorageError as exc:
            if self.auth.store_failure == "open":
                logger.warning("the limits store failed; serving without limits", extra={"reason": str(exc)[:200]})
                return when_open
            raise StoreUnavailableError("The store of API key limits cannot be reached; retry shortly.") from exc
