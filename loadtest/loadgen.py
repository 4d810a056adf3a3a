"""A small HTTP load generator for the gateway benchmarks: closed-loop clients and open-loop rates.

aiohttp on uvloop, one connection per client, so the generator costs little next to what it measures.
An open-loop request's latency counts from when it was due, not when it was sent, so a server that falls
behind is charged for the queue it causes (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

TIMEOUT_S = 60.0


@dataclass(frozen=True, slots=True)
class Shot:
    """One request's outcome: status 0 is a transport failure or a timeout."""

    status: int
    latency_s: float
    ttft_s: float
    events: int


@dataclass(frozen=True, slots=True)
class Target:
    """Where to send and what: ``body`` goes to ``url`` (a completions route)."""

    url: str
    body: dict[str, Any]

    @property
    def streaming(self) -> bool:
        return bool(self.body.get("stream"))


def session(connections: int) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=connections)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=TIMEOUT_S))


async def shoot(client: aiohttp.ClientSession, target: Target, due: float | None = None) -> Shot:
    started = time.perf_counter() if due is None else due
    first = None
    events = 0
    payload = orjson.dumps(target.body)
    try:
        async with client.post(target.url, data=payload, headers={"content-type": "application/json"}) as response:
            if target.streaming and response.status == 200:
                async for line in response.content:
                    if line.startswith(b"data: ") and line != b"data: [DONE]\n":
                        events += 1
                        first = first or time.perf_counter()
            else:
                await response.read()
            status = response.status
    except (aiohttp.ClientError, TimeoutError):
        status = 0
    ended = time.perf_counter()
    return Shot(status, ended - started, (first or ended) - started, events)


async def closed_loop(target: Target, clients: int, duration_s: float) -> tuple[list[Shot], float]:
    """``clients`` clients, each sending its next request when the last one ends, for ``duration_s``."""
    async with session(clients) as client:
        await asyncio.gather(*(shoot(client, target) for _ in range(min(clients, 8))))  # open connections
        deadline = time.perf_counter() + duration_s
        shots: list[Shot] = []

        async def one_client() -> None:
            while time.perf_counter() < deadline:
                shots.append(await shoot(client, target))

        started = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        return shots, time.perf_counter() - started


async def open_loop(target: Target, rate: float, requests: int, connections: int = 1024) -> tuple[list[Shot], float]:
    """``requests`` requests due at ``rate`` per second, whether or not earlier ones have been answered."""
    async with session(connections) as client:
        await asyncio.gather(*(shoot(client, target) for _ in range(8)))
        started = time.perf_counter()
        tasks = []
        for k in range(requests):
            due = started + k / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(shoot(client, target, due)))
        shots = list(await asyncio.gather(*tasks))
        return shots, time.perf_counter() - started


def quantile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation; the single value for one sample."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=1000, method="inclusive")[round(q * 1000) - 1]


def summary(shots: list[Shot], wall_s: float) -> dict[str, Any]:
    ok = [shot for shot in shots if shot.status == 200]
    latencies = [shot.latency_s for shot in ok] or [float("nan")]
    ttfts = [shot.ttft_s for shot in ok] or [float("nan")]
    return {
        "requests": len(shots),
        "ok": len(ok),
        "statuses": {str(status): count for status, count in sorted(Counter(s.status for s in shots).items())},
        "wall_s": wall_s,
        "ok_per_s": len(ok) / wall_s,
        "events_per_s": sum(shot.events for shot in ok) / wall_s,
        "latency_ms": {name: 1000 * quantile(latencies, q) for name, q in (("p50", 0.5), ("p99", 0.99),
                                                                           ("p99.9", 0.999))},
        "ttft_p50_ms": 1000 * quantile(ttfts, 0.5),
    }  # fmt: skip
