"""What each API key used, per model: requests by status, prompt and completion tokens, engine and reward-scorer
calls, work.

A request's usage is recorded once, when its response has ended (a stream's last byte, or the client's
hang-up: then what its engine calls had reported by then), by ``server.auth.AuthMiddleware``. With
``state.url`` the totals are hashes in Valkey/Redis, each request's increments applied in one transaction
(durable as the store's persistence is: run it with AOF); without it, every request is a line appended and
flushed to ``auth.usage_ledger`` (a crash of the gateway loses nothing), summed again at start.
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import redis.asyncio as redis_asyncio
from redis.exceptions import RedisError

from decoding.usage import UsageMeter
from models.errors import StoreUnavailableError
from server.config import StateConfig
from server.quotas import STORE_TIMEOUT_S

logger = logging.getLogger(__name__)

PREFIX = "alignd/usage"
Totals = dict[str, dict[str, dict[str, int]]]
"""key name -> model -> counter -> value."""


@dataclass(frozen=True)
class RequestUsage:
    key: str
    model: str
    status: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    engine_calls: int = 0
    reward_calls: int = 0
    work: int = 0

    @classmethod
    def of(cls, key: str, model: str, status: int, meter: UsageMeter | None, work: int) -> RequestUsage:
        if meter is None:  # refused before any work
            return cls(key, model, status)
        return cls(key, model, status, meter.prompt_tokens, meter.completion_tokens, meter.engine_calls,
                   meter.reward_calls, work)  # fmt: skip

    def counters(self) -> dict[str, int]:
        return {
            "requests": 1, f"status_{self.status}": 1, "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens, "engine_calls": self.engine_calls,
            "reward_calls": self.reward_calls, "work": self.work,
        }  # fmt: skip


class UsageStore(Protocol):
    async def record(self, usage: RequestUsage) -> None: ...

    async def totals(self, key: str | None) -> Totals:
        """One key's totals, or every key's (None)."""
        ...

    async def close(self) -> None: ...


class LedgerUsage:
    """Totals in this process, every request also appended to a ledger file (when one is configured)."""

    def __init__(self, ledger: Path | None) -> None:
        self.ledger = ledger
        self._totals: defaultdict[tuple[str, str], Counter[str]] = defaultdict(Counter)
        if ledger is not None:
            ledger.parent.mkdir(parents=True, exist_ok=True)
        if ledger is not None and ledger.exists():
            text = ledger.read_text()
            if text and not text.endswith("\n"):  # cut short by a crash: the next line must not join it
                with ledger.open("a") as cut_short:
                    cut_short.write("\n")
            for line in text.splitlines():
                try:
                    usage = RequestUsage(**json.loads(line))
                except (ValueError, TypeError):  # a line cut short by a crash mid-write
                    logger.warning("usage ledger line skipped", extra={"path": str(ledger)})
                    continue
                self._totals[usage.key, usage.model].update(usage.counters())

    async def record(self, usage: RequestUsage) -> None:
        self._totals[usage.key, usage.model].update(usage.counters())
        if self.ledger is not None:
            with self.ledger.open("a") as ledger:
                ledger.write(json.dumps(usage.__dict__) + "\n")

    async def totals(self, key: str | None) -> Totals:
        totals: Totals = defaultdict(dict)
        for (name, model), counters in self._totals.items():
            if key is None or name == key:
                totals[name][model] = dict(counters)
        return dict(totals)

    async def close(self) -> None:
        """Nothing is held open: every record is flushed as it is written."""


class RedisUsage:
    """Totals as Valkey/Redis hashes ``alignd/usage/<key>/<model>``."""

    def __init__(self, url: str) -> None:
        self.client = redis_asyncio.from_url(url, socket_timeout=STORE_TIMEOUT_S)

    async def record(self, usage: RequestUsage) -> None:
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                for counter, amount in usage.counters().items():
                    pipe.hincrby(f"{PREFIX}/{usage.key}/{usage.model}", counter, amount)
                await pipe.execute()
        except RedisError:
            # The response is already sent: say what was not recorded, so it can be accounted by hand.
            logger.error("usage could not be recorded", extra={"usage": usage.__dict__}, exc_info=True)

    async def totals(self, key: str | None) -> Totals:
        totals: Totals = defaultdict(dict)
        try:
            async for name in self.client.scan_iter(match=f"{PREFIX}/{key or '*'}/*"):
                _, _, key_name, model = name.decode().split("/", 3)
                values = await self.client.hgetall(name)  # type: ignore[misc]  # redis-py types both clients alike
                totals[key_name][model] = {k.decode(): int(v) for k, v in values.items()}
        except RedisError as exc:
            raise StoreUnavailableError("The usage store cannot be reached; retry shortly.") from exc
        return dict(totals)

    async def close(self) -> None:
        await self.client.aclose()


def usage_store(state: StateConfig, ledger: Path | None) -> UsageStore:
    return LedgerUsage(ledger) if state.redis_url is None else RedisUsage(state.redis_url)
