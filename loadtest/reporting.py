"""Where and how the benchmarks write their reports: ``loadtest/results/<name>.json``."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def write_report(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))


def run_benchmark(
    measure: Callable[[argparse.Namespace], Coroutine[Any, Any, dict[str, Any]]], args: argparse.Namespace
) -> None:
    """Runs a benchmark, writes its report to ``args.output`` and prints it."""
    report = asyncio.run(measure(args))
    write_report(report, args.output)
    print(json.dumps(report, indent=2))
