"""Divergences, the summary and the report on fixed outcomes, with exact values."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from evaluation.divergence import best_of_n_bound, best_of_n_kl, divergence
from evaluation.matrix import parse_matrix
from evaluation.report import PLOTS, write_report
from evaluation.runner import Outcome
from evaluation.summary import summarize

TASKS = [{"id": f"t{i}", "category": "even" if i % 2 == 0 else "odd", "checker": "exact", "reference": "y"}
         for i in range(4)]  # fmt: skip


def outcome(task: dict[str, Any], configuration: str, passed: bool, **extra: Any) -> Outcome:
    values: dict[str, Any] = {"text": "y" if passed else "n", "finish_reason": "stop", "prompt_tokens": 10,
                              "completion_tokens": 5, "details": None, "seconds": 0.5, "loglikelihood": -2.0,
                              "rewards": {"rm": 1.0 if passed else 0.0}, "engine_calls": 1}  # fmt: skip
    return Outcome(task=task, configuration=configuration, passed=passed, **{**values, **extra})


def test_best_of_n_plug_in_kl_is_exact_and_below_the_bound():
    distinct = [{"text": t, "reward": r} for t, r in zip("abcd", (0.1, 0.4, 0.2, 0.3), strict=True)]
    # Four equally likely texts: the best of 2 picks rank k with probability ((k/4)^2 - ((k-1)/4)^2).
    expected = sum(((k / 4) ** 2 - ((k - 1) / 4) ** 2) * math.log(((k / 4) ** 2 - ((k - 1) / 4) ** 2) * 4)
                   for k in range(1, 5))  # fmt: skip
    assert best_of_n_kl(distinct, 2) == pytest.approx(expected)
    assert best_of_n_kl(distinct, 2) < best_of_n_bound(2) == pytest.approx(math.log(2) - 0.5)
    assert best_of_n_kl([{"text": "a", "reward": 1.0}] * 4, 4) == 0.0  # one text: selection changes nothing


def test_each_method_gets_its_own_divergence_kind():
    task = TASKS[0]
    base = [outcome(task, "base", True, loglikelihood=-3.0)]
    candidates = [{"text": t, "reward": r} for t, r in (("a", 0.0), ("b", 1.0))]
    bon = [outcome(task, "bon", True, details={"best_of_n": {"select": "max", "n": 2, "candidates": candidates}})]
    tq = [outcome(task, "tq", True, details={"transfer_q": {"log_ratio": 1.5}})]
    nudged = [outcome(task, "nudged", True, details={"nudging": {"nudged_token_fraction": 0.1}}, loglikelihood=-7.0)]
    assert (divergence(base, base, is_base=True).kind, divergence(base, base, is_base=True).value) == ("base", 0.0)
    shift = divergence(bon, base, is_base=False)
    assert (shift.kind, shift.value, shift.bound) == ("best-of-n", best_of_n_kl(candidates, 2), best_of_n_bound(2))
    assert (divergence(tq, base, is_base=False).kind, divergence(tq, base, is_base=False).value) == ("log-ratio", 1.5)
    proxy = divergence(nudged, base, is_base=False)
    assert (proxy.kind, proxy.value) == ("base-nll-proxy", 4.0)


def test_the_summary_pairs_each_configuration_with_the_baselines(tmp_path: Path):
    matrix = parse_matrix(
        {
            "reward": {"scorers": ["rm"], "model": "base"},
            "base": {"model": "base"},
            "aligned": {"model": "chat"},
            "configurations": [{"name": "x", "model": "base"}],
        }
    )
    outcomes = {
        "base": [outcome(t, "base", False) for t in TASKS],
        "aligned": [outcome(t, "aligned", i < 2) for i, t in enumerate(TASKS)],
        "x": [*(outcome(t, "x", True) for t in TASKS[:3]),
              Outcome(task=TASKS[3], configuration="x", text="", passed=None, finish_reason="error", prompt_tokens=0,
                      completion_tokens=0, details=None, seconds=0.0, error="400 too long")],
    }  # fmt: skip
    summary = summarize(matrix, outcomes, deployment="http://here", tasks=4)
    x = summary["configurations"][2]
    assert (x["requests"], x["errors"], x["error_examples"]) == (4, 1, ["400 too long"])
    assert x["score"] == {"mean": 1.0, "low": 1.0, "high": 1.0, "n": 3}
    assert x["vs_base"] == {"mean": 1.0, "low": 1.0, "high": 1.0, "n": 3}
    assert x["vs_aligned"]["mean"] == pytest.approx(1 / 3) and x["vs_aligned"]["n"] == 3
    assert x["rewards"]["rm"]["mean"] == 1.0 and x["tokens_per_request"] == 15 and x["engine_calls_per_request"] == 1
    assert x["categories"] == {"even": {"mean": 1.0, "low": 1.0, "high": 1.0, "n": 2},
                               "odd": {"mean": 1.0, "low": 1.0, "high": 1.0, "n": 1}}  # fmt: skip
    assert x["divergence"]["kind"] == "base-nll-proxy" and x["divergence"]["value"] == 0.0
    assert summary["configurations"][0]["vs_base"] is None and x["latency"]["p50_s"] == 0.5

    report = write_report(summary, tmp_path)
    text = report.read_text()
    assert "| `x` | 1.00 [1.00, 1.00] | +1.00 [+1.00, +1.00] | +0.33 [" in text and "400 too long" in text
    assert all((tmp_path / plot).stat().st_size > 10_000 for plot in PLOTS)
