"""What a run measured, per configuration: ``summary.json``'s content.

Scores are checker pass rates with 95% bootstrap intervals over tasks; comparisons with the baselines are
paired over the tasks both answered. Rewards, log-likelihoods and costs are means per request; latencies are
percentiles of the client's wall time per request (they vary between runs; everything else reproduces).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from evaluation.divergence import divergence
from evaluation.matrix import ALIGNED, BASE, Matrix
from evaluation.runner import Configuration, Outcome
from evaluation.statistics import Estimate, bootstrap, paired_difference


def summarize(
    matrix: Matrix, outcomes: Mapping[str, Sequence[Outcome]], *, deployment: str, tasks: int
) -> dict[str, Any]:
    configurations = matrix.expand()
    by_role: dict[str | None, Sequence[Outcome]] = {c.role: outcomes[c.name] for c in configurations if c.role}
    return {
        "matrix": matrix.name,
        "deployment": deployment,
        "seed": matrix.seed,
        "tasks": tasks,
        "scorers": list(matrix.reward.scorers),
        "reward_model": matrix.reward.model,
        "configurations": [_configuration(c, outcomes[c.name], by_role) for c in configurations],
    }


def _configuration(
    configuration: Configuration, outcomes: Sequence[Outcome], baselines: Mapping[str | None, Sequence[Outcome]]
) -> dict[str, Any]:
    answered = [o for o in outcomes if o.error is None]
    shift = divergence(answered, baselines.get(BASE), is_base=configuration.role == BASE)
    rewards: dict[str, list[float]] = {}
    for outcome in answered:
        for scorer, value in outcome.rewards.items():
            rewards.setdefault(scorer, []).append(value)
    categories: dict[str, list[float]] = {}
    for outcome in answered:
        if outcome.passed is not None:
            categories.setdefault(str(outcome.task.get("category")), []).append(float(outcome.passed))
    fractions = [
        o.details["nudging"]["nudged_token_fraction"] for o in answered if o.details and "nudging" in o.details
    ]
    latencies = [o.seconds for o in answered]
    return {
        "name": configuration.name,
        "method": configuration.method,
        "grid": dict(configuration.grid),
        "model": configuration.model,
        "route": configuration.route,
        "role": configuration.role,
        "alignment": configuration.alignment,
        "sampling": dict(configuration.sampling),
        "requests": len(outcomes),
        "errors": len(outcomes) - len(answered),
        "error_examples": sorted({o.error for o in outcomes if o.error})[:3],
        "score": _estimate(_scores(answered)),
        "vs_base": _paired(answered, baselines.get(BASE), configuration.role == BASE),
        "vs_aligned": _paired(answered, baselines.get(ALIGNED), configuration.role == ALIGNED),
        "rewards": {scorer: _estimate(values) for scorer, values in rewards.items()},
        "divergence": {"kind": shift.kind, "value": shift.value, "bound": shift.bound, "label": shift.label},
        "base_nll": _mean([-o.loglikelihood for o in answered if o.loglikelihood is not None]),
        "tokens_per_request": _mean([o.prompt_tokens + o.completion_tokens for o in answered]),
        "completion_tokens_per_request": _mean([o.completion_tokens for o in answered]),
        "engine_calls_per_request": _mean([o.engine_calls for o in answered if o.engine_calls is not None]),
        "nudged_token_fraction": _mean(fractions),
        "categories": {name: _estimate(values) for name, values in sorted(categories.items())},
        "latency": {
            "p50_s": float(np.percentile(latencies, 50)) if latencies else None,
            "p99_s": float(np.percentile(latencies, 99)) if latencies else None,
        },
    }


def _scores(outcomes: Sequence[Outcome]) -> list[float]:
    return [float(o.passed) for o in outcomes if o.passed is not None]


def _paired(outcomes: Sequence[Outcome], baseline: Sequence[Outcome] | None, is_it: bool) -> dict[str, Any] | None:
    """This configuration's score minus the baseline's, over the tasks both have a checked answer for."""
    if baseline is None or is_it:
        return None
    theirs = {o.task["id"]: float(o.passed) for o in baseline if o.error is None and o.passed is not None}
    shared = [o for o in outcomes if o.passed is not None and o.task["id"] in theirs]
    if not shared:
        return None
    estimate = paired_difference([float(bool(o.passed)) for o in shared], [theirs[o.task["id"]] for o in shared])
    return _as_dict(estimate, len(shared))


def _estimate(values: Sequence[float]) -> dict[str, Any] | None:
    return _as_dict(bootstrap(values), len(values)) if values else None


def _as_dict(estimate: Estimate, n: int) -> dict[str, Any]:
    return {"mean": estimate.mean, "low": estimate.low, "high": estimate.high, "n": n}


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if values else None
