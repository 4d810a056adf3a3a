"""Chaos under load: closed-loop clients on one model with two managed replicas, one replica SIGKILLed every
few seconds (they take turns, each kill once the replica killed before is back) while the gateway's supervisor
restarts them.

Every response is counted by status and error code (a stream by how it ended: ``[DONE]``, or the code of its
error event); the slowest response, the gateway's memory before and after, and the replicas' restarts are
reported (a client gives up after ``loadgen.TIMEOUT_S``: status 0). What a client may see: 200, 429
(admission), 503 ``engine_unavailable`` (no healthy replica at that moment), and, for a stream whose replica
died under it, an ``upstream_error`` event. A non-streaming request whose replica dies is retried on the
other one. Writes ``loadtest/results/chaos-<stack>.json``.

    python -m loadtest.chaos --stack mock --duration 60 --kill-every 15 --clients 16
    python -m loadtest.chaos --stack vllm-cpu --duration 60 --kill-every 15 --clients 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import orjson
import psutil
import yaml

from evaluation.gateway import LocalGateway
from loadtest.loadgen import quantile, session
from loadtest.mock_vllm import managed_mock
from loadtest.stacks import TINY_MODELS, vllm_model
from models.tiny import ensure_tiny_models

RESULTS = Path(__file__).parent / "results"
MODEL = "tiny-base"
PROMPT = "The quick brown fox"
MAX_TOKENS = 16


@dataclass(frozen=True, slots=True)
class Outcome:
    streamed: bool
    status: int
    code: str
    latency_s: float

    @property
    def label(self) -> str:
        return f"{'stream' if self.streamed else 'plain'} {self.status} {self.code}".rstrip()


def chaos_config(stack: str, models: Path, logs: Path) -> dict[str, Any]:
    if stack == "mock":
        model = managed_mock(MODEL, replicas=2, tokens_per_s=200)
    elif stack == "vllm-cpu":
        model = vllm_model(MODEL, "base")
        model["vllm"] = {**model["vllm"], "replicas": 2}
    else:
        raise ValueError(f"unknown stack {stack!r} (mock, vllm-cpu)")
    return {
        "model_root": str(models), "models": [model],
        "workers": {"log_dir": str(logs), "health_interval_s": 0.5, "restart_backoff_s": 0.5},
        "admission": {"max_in_flight_per_model": 32, "max_queued_per_model": 64, "queue_timeout_s": 10},
    }  # fmt: skip


@contextmanager
def chaos_gateway(stack: str, models: Path = TINY_MODELS) -> Iterator[LocalGateway]:
    ensure_tiny_models(models)
    with tempfile.TemporaryDirectory(prefix="alignd-chaos-") as scratch:
        directory = Path(scratch)
        path = directory / "alignd.yaml"
        path.write_text(yaml.safe_dump(chaos_config(stack, models, directory / "workers")))
        with LocalGateway(path, directory / "alignd.log", startup_timeout=600) as gateway:
            yield gateway


def replicas(gateway: LocalGateway) -> list[dict[str, Any]]:
    return list(httpx.get(f"{gateway.url}/ready", timeout=5).json()["models"][MODEL]["replicas"])


async def request(client: aiohttp.ClientSession, url: str, streamed: bool) -> Outcome:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "stream": streamed}
    started = time.perf_counter()
    code = ""
    try:
        async with client.post(f"{url}/v1/completions", data=orjson.dumps(body),
                               headers={"content-type": "application/json"}) as response:  # fmt: skip
            status = response.status
            if status == 200 and streamed:
                code = "no [DONE]"
                async for line in response.content:
                    if line.startswith(b'data: {"error"'):
                        code = orjson.loads(line[6:])["error"]["code"]
                    elif line == b"data: [DONE]\n" and code == "no [DONE]":
                        code = ""
            else:
                payload = await response.read()
                if status != 200:
                    code = orjson.loads(payload)["error"]["code"]
    except (aiohttp.ClientError, TimeoutError) as exc:
        status, code = 0, type(exc).__name__
    return Outcome(streamed, status, code, time.perf_counter() - started)


async def load(url: str, clients: int, duration_s: float) -> list[Outcome]:
    """``clients`` closed-loop clients, half of them streaming, for ``duration_s``."""
    outcomes: list[Outcome] = []
    deadline = time.perf_counter() + duration_s

    async def one_client(streamed: bool) -> None:
        while time.perf_counter() < deadline:
            outcomes.append(await request(client, url, streamed))

    async with session(clients) as client:
        await asyncio.gather(*(one_client(k % 2 == 1) for k in range(clients)))
    return outcomes


async def kill_replicas(gateway: LocalGateway, every_s: float, duration_s: float) -> list[dict[str, Any]]:
    """SIGKILLs a replica's process group every ``every_s`` (the replicas take turns, the first at ``every_s``),
    once the one killed before is healthy again: one replica down at a time, never the whole model (a vLLM
    replica restarts in tens of seconds, on 2 CPU cores in about 80)."""
    kills = []
    started = time.monotonic()
    turn = 0
    while (elapsed := time.monotonic() - started) + every_s <= duration_s:
        await asyncio.sleep(every_s - elapsed % every_s)
        while not all(replica["healthy"] for replica in await asyncio.to_thread(replicas, gateway)):
            if time.monotonic() - started >= duration_s:
                return kills
            await asyncio.sleep(0.5)
        victim = (await asyncio.to_thread(replicas, gateway))[turn % 2]
        turn += 1
        if victim.get("pid") is None:
            kills.append({"at_s": round(time.monotonic() - started, 1), "url": victim["url"], "pid": None})
            continue
        os.killpg(victim["pid"], signal.SIGKILL)
        kills.append({"at_s": round(time.monotonic() - started, 1), "url": victim["url"], "pid": victim["pid"]})
    return kills


async def chaos(gateway: LocalGateway, clients: int, duration_s: float, kill_every_s: float) -> dict[str, Any]:
    gateway_process = psutil.Process(gateway.process.pid)
    await asyncio.gather(*(request_once(gateway.url, streamed) for streamed in (False, True)))  # warm
    rss_before = gateway_process.memory_info().rss / 2**20
    outcomes, kills = await asyncio.gather(
        load(gateway.url, clients, duration_s), kill_replicas(gateway, kill_every_s, duration_s)
    )
    # Until both replicas are back, so that the memory compares like with like.
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not all(r["healthy"] for r in await asyncio.to_thread(replicas, gateway)):
        await asyncio.sleep(0.5)
    await asyncio.gather(*(request_once(gateway.url, streamed) for streamed in (False, True)))
    rss_after = gateway_process.memory_info().rss / 2**20
    latencies = [outcome.latency_s for outcome in outcomes]
    return {
        "clients": clients, "duration_s": duration_s, "kill_every_s": kill_every_s, "kills": kills,
        "requests": len(outcomes),
        "outcomes": dict(sorted(Counter(outcome.label for outcome in outcomes).items())),
        "latency_s": {"p50": quantile(latencies, 0.5), "p99": quantile(latencies, 0.99), "max": max(latencies)},
        "gateway_rss_mib": {"before": round(rss_before, 1), "after": round(rss_after, 1)},
        "calls_retried_on_another_replica": gateway.log_path.read_text().count('"call retried on another replica"'),
        "replicas_after": await asyncio.to_thread(replicas, gateway),
    }  # fmt: skip


async def request_once(url: str, streamed: bool) -> Outcome:
    async with session(1) as client:
        return await request(client, url, streamed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stack", choices=("mock", "vllm-cpu"), default="mock")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--kill-every", type=float, default=15.0, help="seconds between two kills")
    args = parser.parse_args()
    with chaos_gateway(args.stack) as gateway:
        report = asyncio.run(chaos(gateway, args.clients, args.duration, args.kill_every))
    report["stack"] = args.stack
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"chaos-{args.stack}.json"
    path.write_text(json.dumps(report, indent=2))
    print(json.dumps({key: report[key] for key in ("requests", "outcomes", "latency_s", "gateway_rss_mib")}, indent=2))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
