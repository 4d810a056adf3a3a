"""A short, bounded locust run of every load-test profile against the live gateway: nothing fails, and the
reports carry latency, TTFT and ITL per profile."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from evaluation.gateway import LocalGateway

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[2]
PROFILES = ("plain", "chat", "best_of_4", "guidelines", "grammar", "nudging")


def test_a_short_locust_run_serves_every_profile(server: LocalGateway, tmp_path: Path):
    command = [
        sys.executable, "-m", "loadtest.run_locust", "--host", server.url, "--users", "3", "--duration", "8s",
        "--mix", ",".join(f"{name}=1" for name in PROFILES), "--max-tokens", "8", "--output-dir", str(tmp_path),
        "--name", "smoke",
    ]  # fmt: skip
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    summary = json.loads((tmp_path / "smoke_summary.json").read_text())
    for name in PROFILES:
        profile = summary["profiles"][name]
        assert profile["requests"] > 0 and profile["failed"] == 0, (name, profile)
        assert 0 < profile["ttft_ms"]["count"] <= profile["requests"]  # an empty answer has no first token
        assert profile["latency_ms"]["p50"] >= profile["ttft_ms"]["p50"]
    assert summary["profiles"]["plain"]["itl_ms"]["count"] > 0  # token by token: gaps between chunks
    assert (tmp_path / "smoke.html").stat().st_size > 0
