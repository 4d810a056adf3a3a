"""``alignd eval`` through a live gateway: the toy suite's smoke, resuming a killed run, and bad input.

The smoke runs every configuration of the shipped toy suite on one task per category (``--limit 1``); the
suite's effects at full size are in the README ("Evaluation"), and the toy-world tests assert them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from evaluation.gateway import LocalGateway, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def alignd_eval(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "server.cli", "eval", "--no-progress", *map(str, args)]


def evaluate(*args: str | Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(alignd_eval(*args), capture_output=True, text=True, timeout=timeout, env=env, check=False)


def smoke(gateway: LocalGateway, tasks: Path, output: Path) -> list[str]:
    return ["--suite", "toy", "--tasks", str(tasks), "--limit", "1", "--host", gateway.url, "--output", str(output)]


def reproducible(summary: dict[str, Any]) -> dict[str, Any]:
    """A summary without what varies between runs: wall times and the deployment's port."""
    configurations = [{k: v for k, v in c.items() if k != "latency"} for c in summary["configurations"]]
    return {**summary, "deployment": None, "configurations": configurations}


def test_the_toy_suite_runs_every_method_and_an_interrupted_run_resumes_to_the_same_summary(
    toy_gateway: LocalGateway, toy_world: Path, tmp_path: Path
):
    tasks = toy_world / "tasks.jsonl"
    whole = evaluate(*smoke(toy_gateway, tasks, tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    summary = json.loads((tmp_path / "whole" / "summary.json").read_text())
    by_name = {c["name"]: c for c in summary["configurations"]}
    assert all(c["errors"] == 0 and c["requests"] >= 1 for c in by_name.values())
    assert by_name["base"]["divergence"] == {"kind": "base", "value": 0.0, "bound": None, "label": "the base itself"}
    assert by_name["best-of-n[n=16]"]["divergence"]["kind"] == "best-of-n"
    assert by_name["best-of-n[n=16]"]["divergence"]["value"] <= by_name["best-of-n[n=16]"]["divergence"]["bound"]
    assert by_name["transfer-q[alpha=1.0]"]["divergence"]["kind"] == "log-ratio"
    assert by_name["nudging[gamma=0.4]"]["divergence"]["kind"] == "base-nll-proxy"
    assert by_name["nudging[gamma=0.4]"]["nudged_token_fraction"] is not None
    assert by_name["nudging[gamma=0.4]"]["engine_calls_per_request"] > 1
    assert by_name["best-of-n[n=16]"]["tokens_per_request"] > 4 * by_name["best-of-n[n=1]"]["tokens_per_request"]
    assert all("toy-rm" in c["rewards"] and c["base_nll"] is not None for c in by_name.values())
    report = (tmp_path / "whole" / "report.md").read_text()
    assert all(f"`{name}`" in report for name in by_name)

    # The same run, killed once some results are written, then run again: it sends only what is missing.
    output = tmp_path / "resumed"
    results = output / "results.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    killed = subprocess.Popen(alignd_eval(*smoke(toy_gateway, tasks, output)), env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and (not results.exists() or len(results.read_text().splitlines()) < 12):
        time.sleep(0.2)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    before = len(results.read_text().splitlines())
    assert 12 <= before < sum(c["requests"] for c in by_name.values())
    resumed = evaluate(*smoke(toy_gateway, tasks, output))
    assert resumed.returncode == 0, resumed.stderr
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(lines) == len({(r["configuration"], r["task_id"]) for r in lines}) == len(lines)  # nothing twice
    assert len(lines) == sum(c["requests"] for c in by_name.values())
    again = json.loads((output / "summary.json").read_text())
    assert reproducible(again) == reproducible(summary)


def write_matrix(path: Path, **changes: Any) -> Path:
    matrix = {"name": "bad", "reward": {"scorers": ["toy-rm"], "model": "toy-base"},
              "base": {"model": "toy-base", "route": "completions", "sampling": {"max_tokens": 4}},
              "aligned": {"model": "toy-nudger", "sampling": {"max_tokens": 4}}, **changes}  # fmt: skip
    path.write_text(yaml.safe_dump(matrix))
    return path


def write_tasks(path: Path, *lines: str) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


QUESTION = "What is 2 plus 3?"
GOOD_TASK = json.dumps(
    {
        "id": "t1",
        "messages": [{"role": "user", "content": QUESTION}],
        "prompt": f"User: {QUESTION}\nAssistant:",
        "checker": "last_number",
        "reference": 5,
    }
)


def test_a_malformed_task_file_starts_nothing_unless_told_to_skip_bad_lines(toy_gateway: LocalGateway, tmp_path: Path):
    tasks = write_tasks(tmp_path / "tasks.jsonl", GOOD_TASK, '{"id": "t2"', '{"id": "t3", "checker": "exact"}')
    matrix = write_matrix(tmp_path / "matrix.yaml")
    output = tmp_path / "out"
    refused = evaluate("--matrix", matrix, "--tasks", tasks, "--host", toy_gateway.url, "--output", output)
    assert refused.returncode == 2 and not output.exists()
    assert (
        "line 2: not JSON" in refused.stderr and "line 3: task: a task needs `messages` or `prompt`" in refused.stderr
    )
    skipped = evaluate("--matrix", matrix, "--tasks", tasks, "--host", toy_gateway.url, "--output", output,
                       "--skip-bad")  # fmt: skip
    assert skipped.returncode == 0, skipped.stderr
    assert "skipped line 2" in skipped.stderr
    assert json.loads((output / "summary.json").read_text())["tasks"] == 1


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"aligned": {"model": "toy-nope"}}, "does not serve `toy-nope`"),
        ({"reward": {"scorers": ["nope"], "model": "toy-base"}}, "400 `nope` is not a configured reward scorer."),
        ({"configurations": [{"name": "typo", "model": "toy-base", "alignment": {"nudging": {"nudger": "toy-nudger",
                                                                                            "gama": 0.3}}}]},
         "`typo` was refused on its first task (`t1`): 400"),
    ],
)  # fmt: skip
def test_a_matrix_the_deployment_cannot_run_stops_with_its_reason_and_reports_nothing(
    toy_gateway: LocalGateway, tmp_path: Path, changes: dict[str, Any], message: str
):
    tasks = write_tasks(tmp_path / "tasks.jsonl", GOOD_TASK)
    output = tmp_path / "out"
    refused = evaluate("--matrix", write_matrix(tmp_path / "m.yaml", **changes), "--tasks", tasks,
                       "--host", toy_gateway.url, "--output", output)  # fmt: skip
    assert refused.returncode == 1 and message in refused.stderr, refused.stderr
    assert not (output / "summary.json").exists() and not (output / "report.md").exists()


def test_an_unreachable_host_is_a_clear_error_within_seconds(tmp_path: Path):
    tasks = write_tasks(tmp_path / "tasks.jsonl", GOOD_TASK)
    started = time.monotonic()
    refused = evaluate("--matrix", write_matrix(tmp_path / "m.yaml"), "--tasks", tasks,
                       "--host", f"http://127.0.0.1:{free_port()}", "--output", tmp_path / "out")  # fmt: skip
    assert refused.returncode == 1 and "cannot reach the deployment" in refused.stderr
    assert time.monotonic() - started < 30
