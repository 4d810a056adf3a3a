"""``make bench``: every benchmark in one run, one JSON summary, PNG plots.

1. A concurrency sweep on the vllm-cpu stack (tiny models behind managed vLLM CPU workers, admission bounds
   on): for each of plain, best-of-4, grammar and nudging, locust users at 1..64 for a fixed time each;
   throughput, latency percentiles and failures by cause per level, and the throughput knee.
2. The other benchmarks, one after another, each starting what it measures: gateway overhead vs direct vLLM
   (``gateway_overhead``), best-of-N / scoring / retrieval (``alignment_bench``), nudging and Transfer-Q*
   (``strategies_bench``), the newer methods against what they replace (``methods_bench``), GCD / ASAp decode
   time and trie memory (``grammar_bench``).

Writes ``loadtest/results/bench.json`` and ``loadtest/results/bench_*.png``. With real models on GPUs, point
``--host`` at your deployment (see the README's Performance section).

    python -m loadtest.bench                          # everything (about 40 minutes on 2 CPU cores)
    python -m loadtest.bench --skip-benchmarks        # the sweep only
    python -m loadtest.bench --levels 1 4 16 --level-duration 10s
    python -m loadtest.bench --host http://gpu-gateway:8000 --skip-benchmarks -- --base-model base --chat-model chat
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

from loadtest.run_locust import read_stats, run_locust
from loadtest.stacks import local_stack

HERE = Path(__file__).parent
RESULTS = HERE / "results"
SWEEP_PROFILES = ("plain", "best_of_4", "grammar", "nudging")
# Each script writes loadtest/results/<name>.json.
BENCHMARKS = {
    "gateway_overhead": "loadtest.gateway_overhead",
    "alignment": "loadtest.alignment_bench",
    "strategies": "loadtest.strategies_bench",
    "methods": "loadtest.methods_bench",
    "grammar": "loadtest.grammar_bench",
}
HEADLINE = {
    "alignment": (
        "best_of_n_hf.time_ratio_sequential_over_one_call", "best_of_n_vllm.time_ratio_sequential_over_one_call",
        "best_of_n_vllm.time_ratio_one_call_over_single_sample",
        "scoring_hf.time_ratio_one_by_one_over_batched", "guideline_retrieval.p50_ms", "guideline_retrieval.p99_ms",
    ),
    "strategies": (
        "nudging_prefix_caching_on.wall_ratio_nudging_over_base_only",
        "nudging_prefix_caching_on.engine_calls_per_100_tokens", "transfer_q.speedup_batched_over_sequential",
        "transfer_q.batched_rollouts.engine_calls_per_decision_step",
    ),
    "methods": (
        "early_rejection.rate_75.latency_mean_s_ratio", "early_rejection.rate_75.completion_tokens_per_request_ratio",
        "calibration.calibrated_best_of_8.latency_mean_s_ratio", "gate.sampled_uncertainty.latency_mean_s_ratio",
        "token_guidance.transfer_q.latency_mean_s_ratio", "token_guidance.genarm.latency_mean_s_ratio",
    ),
    "grammar": (
        "json_schema.gcd_over_unconstrained", "json_schema.asap_over_unconstrained", "ebnf.gcd_over_unconstrained",
        "ebnf.asap_over_unconstrained", "trie_ebnf.trie_nodes", "trie_ebnf.traced_memory_mib",
    ),
}  # fmt: skip
# The knee: the fewest users that reach this share of the best throughput.
KNEE_SHARE = 0.9


def sweep(host: str, args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    """Each profile alone at each concurrency level against the gateway at ``host``."""
    rows: dict[str, list[dict[str, Any]]] = {}
    load = {"duration": args.level_duration, "max_tokens": args.max_tokens, "extra": args.locust_args}
    warm_mix = ",".join(f"{name}=1" for name in SWEEP_PROFILES)
    run_locust(host, scratch / "warmup", users=4, mix=warm_mix, **{**load, "duration": "15s"})
    for profile in SWEEP_PROFILES:
        rows[profile] = []
        for users in args.levels:
            prefix = scratch / f"{profile}-u{users}"
            run_locust(host, prefix, users=users, mix=f"{profile}=1", **load)
            rows[profile].append(level_row(users, read_stats(prefix)[profile]))
            print(json.dumps({"profile": profile, **rows[profile][-1]}), flush=True)
    return {"host": host, "levels": args.levels, "level_duration": args.level_duration, "max_tokens": args.max_tokens,
            "profiles": {name: with_knee(profile_rows) for name, profile_rows in rows.items()}}  # fmt: skip


def level_row(users: int, stats: dict[str, Any]) -> dict[str, Any]:
    """One level's outcome: successful requests/s, latency of served requests, refusals, other failures."""
    latency = stats.get("latency_ms", {})
    return {
        "users": users,
        "requests": stats["requests"] + stats["refused"],
        "ok_per_s": stats["requests_per_s"] * (1 - stats["failed"] / max(stats["requests"], 1)),
        "latency_p50_ms": latency.get("p50"),
        "latency_p99_ms": latency.get("p99"),
        "ttft_p50_ms": stats.get("ttft_ms", {}).get("p50"),
        "refused_429": stats["refused"],
        "other_failures": stats["failed"],
        "failure_causes": stats["failures"],
    }


def with_knee(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The rows, the knee, and whether the admission contract held: nothing refused below the knee, and only
    429s (no timeouts, no 5xx) anywhere."""
    best = max(row["ok_per_s"] for row in rows)
    knee = next(row["users"] for row in rows if row["ok_per_s"] >= KNEE_SHARE * best)
    return {
        "rows": rows,
        "max_ok_per_s": best,
        "knee_users": knee,
        "failures_below_knee": sum(row["refused_429"] + row["other_failures"] for row in rows if row["users"] < knee),
        "non_429_failures": sum(row["other_failures"] for row in rows),
    }


def run_benchmarks(names: list[str]) -> dict[str, Any]:
    results = {}
    for name in names:
        print(f"running {BENCHMARKS[name]}", flush=True)
        subprocess.run([sys.executable, "-m", BENCHMARKS[name]], cwd=HERE.parent, check=True)
        results[name] = json.loads((RESULTS / f"{name}.json").read_text())
    return results


def last_results() -> dict[str, Any]:
    """The benchmarks' JSON from their last run, where there is one."""
    paths = {name: RESULTS / f"{name}.json" for name in BENCHMARKS}
    return {name: json.loads(path.read_text()) for name, path in paths.items() if path.exists()}


def headline(results: dict[str, Any]) -> dict[str, Any]:
    """The numbers a reader looks for first, taken from the benchmarks' own JSON."""
    lines: dict[str, Any] = {}
    if "gateway_overhead" in results:
        overhead = results["gateway_overhead"]
        keys = ("added_latency_ms", "throughput_ratio", "gateway_cpu_ms_per_request", "gateway_cpu_us_per_token",
                "upstream_connections")  # fmt: skip
        lines["gateway_vs_mock"] = {point_label(row): {k: row[k] for k in keys if k in row}
                                    for row in overhead["mock"]["rows"]}  # fmt: skip
        if "vllm" in overhead:
            lines["gateway_vs_vllm_cpu"] = {
                f"{row['clients']} streams": {k: row[k] for k in ("throughput_ratio", "added_latency_ms",
                                                                 "gateway_cpu_us_per_token")}
                for row in overhead["vllm"]["rows"]
            }  # fmt: skip
    for name, paths in HEADLINE.items():
        if name in results:
            lines[name] = {path: _at(results[name], path) for path in paths}
    return lines


def point_label(row: dict[str, Any]) -> str:
    """``closed stream 32 clients``, ``open 500/s``, ``paced stream 32 clients``: one gateway benchmark point."""
    kind = "stream" if row["stream"] else "plain"
    if row["load"] == "open":
        return f"open {kind} {row['rate']:g}/s"
    return f"{row['load']} {kind} {row['clients']} clients"


def _at(tree: dict[str, Any], dotted: str) -> Any:
    for key in dotted.split("."):
        tree = tree[key]
    return tree


def plot(sweep_result: dict[str, Any], overhead: dict[str, Any] | None, output: Path) -> list[str]:
    """Throughput, latency and refusals vs users per profile; gateway vs direct vLLM latency."""
    written = []
    figure, (throughput, latency, refused) = plt.subplots(1, 3, figsize=(16, 4.5))
    others = sum(profile["non_429_failures"] for profile in sweep_result["profiles"].values())
    for name, profile in sweep_result["profiles"].items():
        rows = profile["rows"]
        users = [row["users"] for row in rows]
        throughput.plot(users, [row["ok_per_s"] for row in rows], marker="o", label=name)
        latency.plot(users, [row["latency_p50_ms"] for row in rows], marker="o", label=f"{name} p50")
        shares = [100 * row["refused_429"] / max(row["requests"], 1) for row in rows]
        refused.plot(users, shares, marker="o", label=name)
    for axis, title, unit in ((throughput, "Throughput", "successful requests/s"),
                              (latency, "Latency of served requests (p50, until [DONE])", "ms"),
                              (refused, f"Refused with 429 (other failures: {others})", "% of requests")):  # fmt: skip
        axis.set(xscale="log", xlabel="concurrent users", ylabel=unit, title=title)
        axis.set_xticks(sweep_result["levels"], [str(level) for level in sweep_result["levels"]])
        axis.grid(alpha=0.3)
        axis.legend()
    latency.set_yscale("log")
    figure.suptitle(f"alignd, {sweep_result['target']}: closed-loop locust users, {sweep_result['max_tokens']} tokens")
    figure.tight_layout()
    path = output / "bench_concurrency.png"
    figure.savefig(path, dpi=120)
    written.append(path.name)
    plt.close(figure)

    if overhead is not None:
        path = output / "bench_gateway_overhead.png"
        plot_overhead(overhead, path)
        written.append(path.name)
    return written


def plot_overhead(overhead: dict[str, Any], path: Path) -> None:
    """Left: what the gateway adds against the mock upstream, per point; right: against a vLLM CPU worker."""
    figure, (mock, vllm) = plt.subplots(1, 2, figsize=(15, 5), gridspec_kw={"width_ratios": [2, 1]})
    rows = overhead["mock"]["rows"]
    labels = [point_label(row) for row in rows]
    positions = range(len(rows))
    for offset, quantile, color in ((-0.2, "p50", "tab:blue"), (0.2, "p99", "tab:red")):
        values = [max(row["added_latency_ms"][quantile], 0.01) for row in rows]
        mock.bar([p + offset for p in positions], values, width=0.4, color=color, label=f"added {quantile}")
    mock.set_xticks(list(positions), labels, rotation=35, ha="right", fontsize=8)
    mock.set(yscale="log", ylabel="added latency (ms)", title="Gateway vs direct, mock upstream (no model compute)")
    mock.grid(alpha=0.3, axis="y")
    mock.legend()
    if "vllm" in overhead:
        streams = [str(row["clients"]) for row in overhead["vllm"]["rows"]]
        for target, style in (("direct", "s--"), ("gateway", "o-")):
            completed = [row[target]["ok_per_s"] for row in overhead["vllm"]["rows"]]
            vllm.plot(streams, completed, style, label=target)
        vllm.set(xlabel="concurrent streams", ylabel="streams completed/s", title="Gateway vs direct, vLLM CPU worker")
        vllm.grid(alpha=0.3)
        vllm.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--level-duration", default="20s", help="locust run time per profile and level")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--host", help="sweep an already running gateway instead of the local vllm-cpu stack")
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--skip-benchmarks", action="store_true", help="report their last results instead")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--replot", action="store_true", help="only redraw the plots from the last bench.json")
    parser.add_argument("locust_args", nargs="*", help="passed to locust after `--` (e.g. --base-model NAME)")
    args = parser.parse_args()

    args.output.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"benchmark": "bench"}
    if args.replot:
        report = json.loads((args.output / "bench.json").read_text())
        report["plots"] = plot(report["sweep"], report["benchmarks"].get("gateway_overhead"), args.output)
        return
    if not args.skip_sweep:
        with tempfile.TemporaryDirectory(prefix="alignd-bench-") as scratch:
            if args.host:
                report["sweep"] = {"target": args.host, **sweep(args.host, args, Path(scratch))}
            else:
                with local_stack("vllm-cpu") as gateway:
                    target = f"tiny models on vLLM CPU workers, {os.cpu_count()} cores"
                    report["sweep"] = {"target": target, **sweep(gateway.url, args, Path(scratch))}
    results = last_results() if args.skip_benchmarks else run_benchmarks(list(BENCHMARKS))
    report["benchmarks"] = results
    report["headline"] = headline(results)
    if "sweep" in report:
        report["plots"] = plot(report["sweep"], results.get("gateway_overhead"), args.output)
    path = args.output / "bench.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
