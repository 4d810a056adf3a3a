"""Slow and idle clients (slowloris) against a gateway with ``read_timeout_s: 2``: a client trickling its
headers or its body a byte at a time, and connections that send nothing, are answered 408 and closed within
the timeout, while another client's requests keep their latency. The gateway fronts the mock worker of
``loadtest/``, so the figures measure the gateway alone."""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psutil
import pytest
import yaml

from evaluation.gateway import LocalGateway
from loadtest.mock_vllm import MockWorker

READ_TIMEOUT_S = 2.0
# A connection must be closed this long after the timeout at most (the event loop's scheduling, this machine).
CLOSE_MARGIN_S = 2.0
# No attacker is waited for longer than this: a server that never closes fails the test, not hangs it.
GIVE_UP_S = 15.0
# Out of step with the timeout: a byte arriving as the server closes makes the kernel reset the connection,
# and a reset throws away the 408 not yet read (what a real slow client would see; here it would be a flake).
TRICKLE_EVERY_S = 0.45
ATTACKERS = {"slow-headers": 50, "slow-body": 20, "idle": 200}
HEAD = b"POST /v1/completions HTTP/1.1\r\nhost: alignd\r\ncontent-type: application/json\r\n"


@dataclass
class Outcome:
    status: int | None
    closed_after_s: float | None
    body: bytes


@pytest.fixture(scope="module")
def gateway(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalGateway]:
    directory = tmp_path_factory.mktemp("hostile-gateway")
    with MockWorker("mock") as mock:
        config = {"model_root": str(tiny_models), "models": [mock.served_model()], "read_timeout_s": READ_TIMEOUT_S}
        (directory / "alignd.yaml").write_text(yaml.safe_dump(config))
        with LocalGateway(directory / "alignd.yaml", directory / "alignd.log") as live:
            yield live


async def attacker(url: str, first: bytes, trickle: bytes) -> Outcome:
    """Connects, sends ``first``, then one byte of ``trickle`` (cycled) every ``TRICKLE_EVERY_S`` until the server
    closes the connection; what it answered, and when it closed."""
    address = urlsplit(url)
    reader, writer = await asyncio.open_connection(address.hostname, address.port)
    start = time.monotonic()
    writer.write(first)
    received, trickled = b"", itertools.cycle(trickle) if trickle else None
    try:
        while time.monotonic() - start < GIVE_UP_S:
            try:
                data = await asyncio.wait_for(reader.read(65536), TRICKLE_EVERY_S)
            except TimeoutError:
                if trickled is not None:
                    writer.write(bytes([next(trickled)]))
                continue
            if not data:
                head, _, body = received.partition(b"\r\n\r\n")
                status = int(head.split(b" ")[1]) if head.startswith(b"HTTP/1.1") else None
                return Outcome(status, time.monotonic() - start, body)
            received += data
    except ConnectionError:
        return Outcome(None, time.monotonic() - start, received)
    finally:
        writer.close()
    return Outcome(None, None, received)


async def reference_client(url: str, model: str, stop: asyncio.Event) -> list[tuple[float, float, int]]:
    """(start, latency, status) of a well-behaved client's requests, one after another, until ``stop``."""
    timings = []
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        while not stop.is_set():
            start = time.monotonic()
            response = await client.post("/v1/completions", json={"model": model, "prompt": [5, 6, 7], "max_tokens": 4})
            timings.append((start, time.monotonic() - start, response.status_code))
            await asyncio.sleep(0.02)
    return timings


def summary(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    return {
        "requests": len(ordered),
        "p50_ms": round(statistics.median(ordered) * 1000, 1),
        "p99_ms": round(ordered[int(0.99 * (len(ordered) - 1))] * 1000, 1),
        "max_ms": round(ordered[-1] * 1000, 1),
    }


async def attack(gateway: LocalGateway) -> tuple[dict[str, list[Outcome]], list[tuple[float, float, int]], float]:
    stop = asyncio.Event()
    reference = asyncio.create_task(reference_client(gateway.url, "mock", stop))
    await asyncio.sleep(2.0)
    attack_start = time.monotonic()
    slow_body = HEAD + b"content-length: 1000\r\n\r\n"
    kinds = {
        "slow-headers": (HEAD, b"x-padding: slow\r\n"),
        "slow-body": (slow_body, b'{"model": "mock", "prompt": "' + b"x" * 900),
        "idle": (b"", b""),
    }
    tasks = {
        kind: [asyncio.create_task(attacker(gateway.url, *kinds[kind])) for _ in range(count)]
        for kind, count in ATTACKERS.items()
    }
    outcomes = {kind: list(await asyncio.gather(*attackers)) for kind, attackers in tasks.items()}
    stop.set()
    return outcomes, await reference, attack_start


def test_slow_and_idle_clients_get_a_408_and_others_are_unaffected(gateway: LocalGateway):
    process = psutil.Process(gateway.process.pid)
    rss_before = process.memory_info().rss
    outcomes, timings, attack_start = asyncio.run(attack(gateway))
    for kind, results in outcomes.items():
        closed = [o.closed_after_s for o in results]
        assert all(o.status == 408 for o in results), (kind, [o for o in results if o.status != 408][:3])
        assert all(s is not None and s < READ_TIMEOUT_S + CLOSE_MARGIN_S for s in closed), (kind, max(closed))
        assert all(b'"code":"request_timeout"' in o.body.replace(b" ", b"") for o in results), results[0].body
        print(f"{kind}: {len(results)} connections, 408 and closed after {min(closed):.2f}-{max(closed):.2f} s")
    assert {status for _, _, status in timings} == {200}
    before = summary([latency for start, latency, _ in timings if start < attack_start])
    during = summary([latency for start, latency, _ in timings if start >= attack_start])
    rss_growth_mib = (process.memory_info().rss - rss_before) / 2**20
    print(f"reference client before: {before}; during the attack: {during}; gateway RSS +{rss_growth_mib:.1f} MiB")
    # The mock answers in milliseconds: a gateway busy with its attackers would show in seconds.
    assert during["max_ms"] < 1000, during
    assert rss_growth_mib < 64
