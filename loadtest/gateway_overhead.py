"""The gateway's own cost: the same load sent directly to an upstream and through alignd, side by side.

1. **Against the mock upstream** (``loadtest.mock_vllm``, no model compute), so nothing but the gateway is
   measured: non-streaming and streaming at 1, 32 and 256 closed-loop clients, non-streaming open-loop at
   100, 500 and 2,000 requests/s, and streams paced like a GPU worker (``--paced-tokens-per-s``, a time to
   first token). Per point: added latency p50/p99/p99.9, the achieved rate, statuses, the gateway's CPU time
   per request and per streamed token (its process's own counters), and the TCP connections it opened to
   the upstream.
2. **Against a vLLM CPU worker** (the tiny base model, ``--skip-vllm`` to leave out): streams at 1, 8 and 32.

The gateway runs on CPU 1; the upstream and the load generator share CPU 0 (one core each would be better;
this machine has two). Writes ``loadtest/results/gateway_overhead.json``.

    python -m loadtest.gateway_overhead
    python -m loadtest.gateway_overhead --skip-vllm --duration 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

from evaluation.gateway import LocalGateway
from loadtest.loadgen import Shot, Target, closed_loop, open_loop, summary
from loadtest.mock_vllm import MockWorker
from loadtest.reporting import RESULTS, write_report
from loadtest.stacks import vllm_model
from models.tiny import ensure_tiny_models
from models.tokenizer import Tokenizer

PROMPT = "def fibonacci(n):\n    "
Load = Callable[[Target], Awaitable[tuple[list[Shot], float]]]


def _pin(pid: int, cpu: int | None) -> None:
    if cpu is not None:
        psutil.Process(pid).cpu_affinity([cpu])


def _cpus() -> tuple[int | None, int | None]:
    """(the gateway's CPU, everyone else's): apart where the machine has two cores or more."""
    return (1, 0) if (os.cpu_count() or 1) >= 2 else (None, None)


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def compare(
    point: dict[str, Any],
    load: Load,
    direct: Target,
    through: Target,
    gateway_pid: int,
    tokens: int,
    mock: MockWorker | None = None,
) -> dict[str, Any]:
    """One point: the load straight to the upstream, then through the gateway (and, with the ``mock``
    upstream, the connections the gateway opened to it)."""
    direct_result = summary(*asyncio.run(load(direct)))
    connections, cpu = _connections(mock), cpu_seconds(gateway_pid)
    gateway_result = summary(*asyncio.run(load(through)))
    cpu, connections = cpu_seconds(gateway_pid) - cpu, _connections(mock) - connections
    ok = max(gateway_result["ok"], 1)
    row = {
        **point,
        "direct": direct_result,
        "gateway": gateway_result,
        "added_latency_ms": {q: gateway_result["latency_ms"][q] - direct_result["latency_ms"][q]
                             for q in direct_result["latency_ms"]},
        "throughput_ratio": gateway_result["ok_per_s"] / direct_result["ok_per_s"],
        "gateway_cpu_ms_per_request": 1000 * cpu / ok,
    }  # fmt: skip
    if mock is not None:
        row["upstream_connections"] = connections
    if through.streaming:
        row["added_ttft_p50_ms"] = gateway_result["ttft_p50_ms"] - direct_result["ttft_p50_ms"]
        row["gateway_cpu_us_per_token"] = 1e6 * cpu / (ok * tokens)
    print(json.dumps({k: v for k, v in row.items() if k not in ("direct", "gateway")}, default=round), flush=True)
    return row


def _connections(mock: MockWorker | None) -> int:
    return mock.stats()["connections"] if mock is not None else 0


def mock_config(models: Path, instant: MockWorker, paced: MockWorker) -> dict[str, Any]:
    # Admission as shipped; the log at warning so the access log costs what a production gateway's would.
    return {"model_root": str(models), "log_level": "warning",
            "models": [instant.served_model(), paced.served_model()]}  # fmt: skip


@contextlib.contextmanager
def gateway_on(config: dict[str, Any], cpu: int | None, *, startup_timeout: float = 120) -> Iterator[LocalGateway]:
    with tempfile.TemporaryDirectory(prefix="alignd-overhead-") as scratch:
        path = Path(scratch) / "alignd.yaml"
        path.write_text(yaml.safe_dump(config))
        with LocalGateway(path, Path(scratch) / "alignd.log", startup_timeout=startup_timeout) as gateway:
            _pin(gateway.process.pid, cpu)
            yield gateway


def prompt_ids(models: Path) -> list[int]:
    """The token ids the gateway sends upstream for PROMPT, so direct requests carry the same prompt."""
    return Tokenizer(models / "base", name="tiny-base").prompt_ids(PROMPT)


def against_mock(models: Path, args: argparse.Namespace) -> dict[str, Any]:
    gateway_cpu, other_cpu = _cpus()
    instant = MockWorker("mock")
    paced = MockWorker("mock-paced", tokens_per_s=args.paced_tokens_per_s, ttft_ms=args.paced_ttft_ms)
    for mock in (instant, paced):
        _pin(mock.process.pid, other_cpu)
    try:
        with gateway_on(mock_config(models, instant, paced), gateway_cpu) as gateway:
            ids = list(range(5, 5 + args.prompt_tokens))

            def targets(model: str, mock: MockWorker, **body: Any) -> tuple[Target, Target]:
                return (Target(f"{mock.url}/v1/completions", {"model": model, "prompt": ids, **body}),
                        Target(f"{gateway.url}/v1/completions", {"model": model, "prompt": ids, **body}))  # fmt: skip

            def run(point: dict[str, Any], load: Load, pair: tuple[Target, Target], mock: MockWorker) -> dict[str, Any]:
                return compare(point, load, *pair, gateway.process.pid, args.stream_tokens, mock)

            plain = targets("mock", instant, max_tokens=16)
            streamed = targets("mock", instant, max_tokens=args.stream_tokens, stream=True)
            paced_pair = targets("mock-paced", paced, max_tokens=args.stream_tokens, stream=True)
            rows = []
            run({"load": "warm-up", "clients": 8}, lambda t: closed_loop(t, 8, 2.0), plain, instant)
            for stream, pair in ((False, plain), (True, streamed)):
                for clients in args.clients:
                    load = _closed(clients, args.duration)
                    rows.append(run({"load": "closed", "stream": stream, "clients": clients}, load, pair, instant))
            for rate in args.rates:
                requests = max(int(rate * args.duration), args.min_open_requests)
                load = _open(rate, requests)
                rows.append(run({"load": "open", "stream": False, "rate": rate}, load, plain, instant))
            for clients in args.paced_clients:
                load = _closed(clients, max(args.duration, 3 * args.stream_tokens / args.paced_tokens_per_s))
                point = {"load": "paced", "stream": True, "clients": clients,
                         "tokens_per_s": args.paced_tokens_per_s, "ttft_ms": args.paced_ttft_ms}  # fmt: skip
                rows.append(run(point, load, paced_pair, paced))
    finally:
        instant.stop()
        paced.stop()
    return {"prompt_tokens": args.prompt_tokens, "stream_tokens": args.stream_tokens, "rows": rows}


def _closed(clients: int, duration_s: float) -> Load:
    return lambda target: closed_loop(target, clients, duration_s)


def _open(rate: float, requests: int) -> Load:
    return lambda target: open_loop(target, rate, requests)


def against_vllm(models: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Streams to the managed vLLM CPU worker (pinned to CPU 0 by its config) and through the gateway."""
    gateway_cpu, _ = _cpus()
    config = {"model_root": str(models), "log_level": "warning", "models": [vllm_model("tiny-base", "base")]}
    with gateway_on(config, gateway_cpu, startup_timeout=300) as gateway:
        worker = httpx.get(f"{gateway.url}/ready").json()["models"]["tiny-base"]["replicas"][0]["url"]
        body = {"model": "tiny-base", "max_tokens": args.vllm_tokens, "stream": True, "temperature": 1.0}
        ids = prompt_ids(models)
        direct = Target(f"{worker}/v1/completions", {**body, "prompt": ids})
        through = Target(f"{gateway.url}/v1/completions", {**body, "prompt": PROMPT})
        asyncio.run(closed_loop(direct, 4, 3.0))
        asyncio.run(closed_loop(through, 4, 3.0))
        rows = [compare({"clients": clients}, _closed(clients, args.vllm_duration), direct, through,
                        gateway.process.pid, args.vllm_tokens) for clients in args.vllm_clients]  # fmt: skip
    return {"stream_tokens": args.vllm_tokens, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 32, 256])
    parser.add_argument("--rates", type=float, nargs="+", default=[100, 500, 2000])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per point and target")
    parser.add_argument("--min-open-requests", type=int, default=1000, help="per open-loop point (for p99.9)")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--stream-tokens", type=int, default=64)
    parser.add_argument("--paced-clients", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--paced-tokens-per-s", type=float, default=50.0)
    parser.add_argument("--paced-ttft-ms", type=float, default=20.0)
    parser.add_argument("--skip-vllm", action="store_true")
    parser.add_argument("--vllm-clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--vllm-duration", type=float, default=10.0)
    parser.add_argument("--vllm-tokens", type=int, default=32)
    parser.add_argument("--models", type=Path, default=Path("~/.cache/alignd/tiny-models").expanduser())
    parser.add_argument("--output", type=Path, default=RESULTS / "gateway_overhead.json")
    args = parser.parse_args()

    ensure_tiny_models(args.models)
    _, other_cpu = _cpus()
    _pin(os.getpid(), other_cpu)  # the load generator
    report: dict[str, Any] = {"benchmark": "gateway_overhead", "cpus": os.cpu_count()}
    report["mock"] = against_mock(args.models, args)
    if not args.skip_vllm:
        report["vllm"] = against_vllm(args.models, args)
    write_report(report, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
