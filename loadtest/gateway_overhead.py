"""Gateway overhead: the same streaming load against alignd and directly against its vLLM worker.

Starts ``alignd serve`` with one managed vLLM CPU worker (the tiny base model),
then, at each concurrency, sends the same requests to both, alternating,
and reports the gateway's added p50/p99 latency and its throughput ratio.

    python -m loadtest.gateway_overhead --concurrency 1 8 32 --requests 64

Writes ``loadtest/results/gateway_overhead.json``. On a 2-core machine the
gateway and the worker share the CPU, so the overhead here is an upper bound.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from evaluation.gateway import LocalGateway
from loadtest.stacks import vllm_model
from models.tiny import ensure_tiny_models

RESULTS = Path(__file__).parent / "results"
PROMPT = "def fibonacci(n):\n    "


async def one_stream(client: httpx.AsyncClient, url: str, model: str, max_tokens: int) -> dict[str, float]:
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "stream": True, "temperature": 1.0}
    started = time.perf_counter()
    first = None
    chunks = 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks += 1
                first = first or time.perf_counter()
    ended = time.perf_counter()
    return {"latency_s": ended - started, "ttft_s": (first or ended) - started, "chunks": chunks}


async def run_load(url: str, model: str, concurrency: int, requests: int, max_tokens: int) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        semaphore = asyncio.Semaphore(concurrency)

        async def bounded() -> dict[str, float]:
            async with semaphore:
                return await one_stream(client, url, model, max_tokens)

        started = time.perf_counter()
        samples = await asyncio.gather(*(bounded() for _ in range(requests)))
        wall = time.perf_counter() - started
    return summarise(samples, wall)


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def summarise(samples: list[dict[str, float]], wall: float) -> dict[str, Any]:
    latencies = [s["latency_s"] for s in samples]
    ttfts = [s["ttft_s"] for s in samples]
    return {
        "requests": len(samples),
        "wall_s": wall,
        "requests_per_s": len(samples) / wall,
        "latency_p50_s": percentile(latencies, 50),
        "latency_p99_s": percentile(latencies, 99),
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p99_s": percentile(ttfts, 99),
    }


def config(models: Path, logs: Path) -> dict[str, Any]:
    return {"model_root": str(models), "models": [vllm_model("tiny-base", "base")], "workers": {"log_dir": str(logs)}}


async def compare(gateway: str, worker: str, levels: list[int], requests: int, max_tokens: int) -> list[dict]:
    rows = []
    await run_load(worker, "tiny-base", 4, 8, max_tokens)  # warm-up both paths
    await run_load(gateway, "tiny-base", 4, 8, max_tokens)
    for concurrency in levels:
        direct = await run_load(worker, "tiny-base", concurrency, requests, max_tokens)
        through = await run_load(gateway, "tiny-base", concurrency, requests, max_tokens)
        rows.append(
            {
                "concurrency": concurrency,
                "direct": direct,
                "gateway": through,
                "added_latency_p50_ms": 1000 * (through["latency_p50_s"] - direct["latency_p50_s"]),
                "added_latency_p99_ms": 1000 * (through["latency_p99_s"] - direct["latency_p99_s"]),
                "added_ttft_p50_ms": 1000 * (through["ttft_p50_s"] - direct["ttft_p50_s"]),
                "throughput_ratio": through["requests_per_s"] / direct["requests_per_s"],
            }
        )
        print(json.dumps(rows[-1], indent=None, default=round))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=64, help="requests per concurrency level and target")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--models", type=Path, default=Path("~/.cache/alignd/tiny-models").expanduser())
    parser.add_argument("--output", type=Path, default=RESULTS / "gateway_overhead.json")
    args = parser.parse_args()

    ensure_tiny_models(args.models)
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "alignd.yaml"
        path.write_text(yaml.safe_dump(config(args.models, Path(scratch) / "workers")))
        with LocalGateway(path, Path(scratch) / "alignd.log", startup_timeout=300) as gateway:
            ready = httpx.get(f"{gateway.url}/ready").json()
            worker = ready["models"]["tiny-base"]["replicas"][0]["url"]
            rows = asyncio.run(compare(gateway.url, worker, args.concurrency, args.requests, args.max_tokens))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    report = {"benchmark": "gateway_overhead", "max_tokens": args.max_tokens, "rows": rows}
    args.output.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
