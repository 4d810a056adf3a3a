"""The report people read: ``report.md`` with the tables, and three PNG plots beside it.

- ``score_vs_cost.png``: checker score (95% interval) against tokens per request, one line per method;
- ``reward_vs_divergence.png``: mean reward against the divergence from the base, one curve per method as its
  grid parameter varies (the reward-KL frontier of the papers; each method's divergence kind in its label);
- ``score_by_category.png``: the score of every configuration in every task category.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

PLOTS = ("score_vs_cost.png", "reward_vs_divergence.png", "score_by_category.png")


def write_report(summary: Mapping[str, Any], directory: Path) -> Path:
    """Writes ``report.md`` and the plots into ``directory``; returns the report's path."""
    _plot_score_vs_cost(summary, directory / PLOTS[0])
    _plot_reward_vs_divergence(summary, directory / PLOTS[1])
    _plot_score_by_category(summary, directory / PLOTS[2])
    path = directory / "report.md"
    path.write_text(markdown(summary), encoding="utf-8")
    return path


def markdown(summary: Mapping[str, Any]) -> str:
    configurations = summary["configurations"]
    scorers = summary["scorers"]
    lines = [
        f"# alignd eval: {summary['matrix']}",
        "",
        f"Deployment {summary['deployment']}; {summary['tasks']} tasks; seed {summary['seed']}; rewards by "
        f"{', '.join(f'`{s}`' for s in scorers) or 'no scorer'} on `{summary['reward_model']}`'s prompts. "
        "Scores are checker pass rates with 95% bootstrap intervals; Δ are paired over the tasks both answered.",
        "",
        "| configuration | score | Δ vs base | Δ vs aligned | "
        + "".join(f"reward `{s}` | " for s in scorers)
        + "divergence | base NLL | tokens/request | engine calls | p50 s | p99 s | nudged | errors |",
        "|" + "---|" * (12 + len(scorers)),
    ]
    for c in configurations:
        cells = [
            f"`{c['name']}`",
            _interval(c["score"]),
            _interval(c["vs_base"], signed=True),
            _interval(c["vs_aligned"], signed=True),
            *(_interval(c["rewards"].get(s)) for s in scorers),
            _divergence(c["divergence"]),
            _number(c["base_nll"], 1),
            _number(c["tokens_per_request"], 0),
            _number(c["engine_calls_per_request"], 1),
            _number(c["latency"]["p50_s"], 2),
            _number(c["latency"]["p99_s"], 2),
            _number(c["nudged_token_fraction"], 3),
            str(c["errors"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    kinds = {c["divergence"]["kind"]: c["divergence"]["label"] for c in configurations}
    lines += ["", "Divergence kinds:", *(f"- `{kind}`: {label}" for kind, label in kinds.items())]
    lines += ["- best-of-N also shows its analytic bound `log N - (N-1)/N` after the slash.", ""]
    lines += _category_table(configurations)
    errors = [(c["name"], e) for c in configurations for e in c["error_examples"]]
    if errors:
        lines += ["", "## Refused requests", *(f"- `{name}`: {error}" for name, error in errors)]
    lines += ["", *(f"![{plot}]({plot})" for plot in PLOTS), ""]
    return "\n".join(lines)


def _category_table(configurations: Sequence[Mapping[str, Any]]) -> list[str]:
    categories = sorted({name for c in configurations for name in c["categories"]})
    if not categories:
        return []
    lines = ["## Score by category", "", "| configuration | " + " | ".join(categories) + " |",
             "|" + "---|" * (len(categories) + 1)]  # fmt: skip
    for c in configurations:
        lines.append(
            f"| `{c['name']}` | " + " | ".join(_number(_mean_of(c["categories"].get(k)), 2) for k in categories) + " |"
        )
    return lines


def _interval(estimate: Mapping[str, Any] | None, *, signed: bool = False) -> str:
    if estimate is None:
        return "-"
    sign = "+" if signed else ""
    return f"{estimate['mean']:{sign}.2f} [{estimate['low']:{sign}.2f}, {estimate['high']:{sign}.2f}]"


def _divergence(record: Mapping[str, Any]) -> str:
    value = _number(record["value"], 2)
    bound = f" / {record['bound']:.2f}" if record["bound"] is not None else ""
    return f"{value}{bound} ({record['kind']})"


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _mean_of(estimate: Mapping[str, Any] | None) -> float | None:
    return None if estimate is None else float(estimate["mean"])


def _curves(configurations: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    curves: dict[str, list[Mapping[str, Any]]] = {}
    for c in configurations:
        curves.setdefault(c["method"], []).append(c)
    return curves


def _figure() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, figure: Any, axes: Any, title: str, path: Path) -> None:
    axes.set_title(title)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _plot_score_vs_cost(summary: Mapping[str, Any], path: Path) -> None:
    plt = _figure()
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for method, points in _curves(summary["configurations"]).items():
        points = [p for p in points if p["score"] is not None and p["tokens_per_request"]]
        if not points:
            continue
        x = [p["tokens_per_request"] for p in points]
        y = [p["score"]["mean"] for p in points]
        errors = [[p["score"]["mean"] - p["score"]["low"] for p in points],
                  [p["score"]["high"] - p["score"]["mean"] for p in points]]  # fmt: skip
        axes.errorbar(x, y, yerr=errors, marker="o", capsize=3, label=method)
    axes.set_xscale("log")
    axes.set_xlabel("tokens per request (every engine call; log scale)")
    axes.set_ylabel("checker score (95% CI)")
    _save(plt, figure, axes, f"{summary['matrix']}: score vs cost", path)


def _plot_reward_vs_divergence(summary: Mapping[str, Any], path: Path) -> None:
    plt = _figure()
    figure, axes = plt.subplots(figsize=(7, 4.5))
    scorer = summary["scorers"][0] if summary["scorers"] else None
    for method, points in _curves(summary["configurations"]).items():
        points = [p for p in points if scorer in p["rewards"] and p["divergence"]["value"] is not None]
        if scorer is None or not points:
            continue
        x = [p["divergence"]["value"] for p in points]
        y = [p["rewards"][scorer]["mean"] for p in points]
        axes.plot(x, y, marker="o", label=f"{method} ({points[0]['divergence']['kind']})")
        for p, xi, yi in zip(points, x, y, strict=True):
            if p["grid"]:
                axes.annotate(",".join(str(v) for v in p["grid"].values()), (xi, yi), fontsize=7,
                              textcoords="offset points", xytext=(3, 3))  # fmt: skip
    axes.set_xscale("symlog", linthresh=1.0)
    axes.set_xlabel("divergence from the base (nats, symlog; kind per method)")
    axes.set_ylabel(f"mean reward `{scorer}`" if scorer else "reward")
    _save(plt, figure, axes, f"{summary['matrix']}: reward vs divergence", path)


def _plot_score_by_category(summary: Mapping[str, Any], path: Path) -> None:
    plt = _figure()
    configurations = summary["configurations"]
    categories = sorted({name for c in configurations for name in c["categories"]})
    grid = [[_mean_of(c["categories"].get(k)) for k in categories] for c in configurations]
    values = [[math.nan if v is None else v for v in row] for row in grid]
    figure, axes = plt.subplots(figsize=(1.2 + 0.9 * max(len(categories), 1), 1.0 + 0.35 * len(configurations)))
    image = axes.imshow(values, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    axes.set_xticks(range(len(categories)), categories, rotation=45, ha="right", fontsize=8)
    axes.set_yticks(range(len(configurations)), [c["name"] for c in configurations], fontsize=8)
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            if value is not None:
                axes.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                          color="white" if value < 0.5 else "black")  # fmt: skip
    figure.colorbar(image, ax=axes, label="score")
    axes.set_title(f"{summary['matrix']}: score by category")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
