"""The newer methods' costs beside what they replace, in one run, through the HTTP API on the toy world.

Each group runs its variants over the same held-out tasks, one request at a time, against the embedded
gateway (in-process engine) or ``--host``:

- ``early_rejection``: best-of-16 vs early rejection at rates 0.5 and 0.75 (first checkpoint 3, 2 rounds);
- ``calibration``: best-of-8 vs calibrated best-of-8 (16 references);
- ``gate``: a greedy answer vs the same with ``uncertainty`` (its greedy answer reused) and ``abstain``, and a
  sampled answer vs the same with ``uncertainty`` (one more greedy call);
- ``token_guidance``: ARGS vs Transfer-Q* (8-token rollouts) vs GenARM, all on the base's top 4 tokens.

Per variant: latency p50 and mean, completion tokens and engine calls per request, and their ratios to the
group's first variant. Writes ``loadtest/results/methods.json``.

    python -m loadtest.methods_bench                       # about 3 minutes on 2 CPU cores
    python -m loadtest.methods_bench --tasks 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import openai
import yaml

from evaluation.gateway import LocalGateway
from evaluation.runner import Configuration, Outcome, run_configuration
from loadtest.reporting import RESULTS, run_benchmark
from toyworld.build import ensure_toy_world

KNOWLEDGE = ("capital", "country", "birth-year", "sum")
STOP = ["\nUser:"]
SAMPLED = {"temperature": 1.0, "max_tokens": 40, "stop": STOP, "seed": 0}
GREEDY_CHAT = {"temperature": 0, "max_tokens": 48}
GUIDED = {"max_tokens": 24, "stop": STOP, "seed": 0}
REJECTING = {"n": 16, "reward": "toy-rm", "first_checkpoint": 3, "rounds": 2}
TRANSFER_Q = {"baseline": "toy-baseline", "reward": "toy-rm", "top_k": 4, "rollout_tokens": 8}
ABSTAIN = {"threshold": 0.12, "answer": "I do not know."}

GROUPS: dict[str, list[Configuration]] = {
    "early_rejection": [
        Configuration("best_of_16", "toy-base", "completions", {"best_of_n": {"n": 16, "reward": "toy-rm"}}, SAMPLED),
        Configuration("rate_50", "toy-base", "completions",
                      {"early_rejection": {**REJECTING, "rejection_rate": 0.5}}, SAMPLED),
        Configuration("rate_75", "toy-base", "completions",
                      {"early_rejection": {**REJECTING, "rejection_rate": 0.75}}, SAMPLED),
    ],
    "calibration": [
        Configuration("best_of_8", "toy-base", "completions", {"best_of_n": {"n": 8, "reward": "toy-rm"}}, SAMPLED),
        Configuration("calibrated_best_of_8", "toy-base", "completions",
                      {"best_of_n": {"n": 8, "reward": "toy-rm", "calibrate": {"references": 16}}}, SAMPLED),
    ],
    "gate": [
        Configuration("greedy", "toy-baseline", sampling=GREEDY_CHAT),
        Configuration("greedy_uncertainty", "toy-baseline", alignment={"uncertainty": {}}, sampling=GREEDY_CHAT),
        Configuration("greedy_abstain", "toy-baseline", alignment={"abstain": ABSTAIN}, sampling=GREEDY_CHAT),
        Configuration("sampled", "toy-baseline", sampling={**GREEDY_CHAT, "temperature": 1.0, "seed": 0}),
        Configuration("sampled_uncertainty", "toy-baseline", alignment={"uncertainty": {}},
                      sampling={**GREEDY_CHAT, "temperature": 1.0, "seed": 0}),
    ],
    "token_guidance": [
        Configuration("args", "toy-base", alignment={"transfer_q": {**TRANSFER_Q, "rollout_tokens": 0}},
                      sampling=GUIDED),
        Configuration("transfer_q", "toy-base", alignment={"transfer_q": TRANSFER_Q}, sampling=GUIDED),
        Configuration("genarm", "toy-base", alignment={"genarm": {"reward_model": "toy-arm", "top_k": 4, "beta": 2.0}},
                      sampling=GUIDED),
    ],
}  # fmt: skip


def variant_row(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    answered = [o for o in outcomes if o.error is None]
    seconds = [o.seconds for o in answered]
    return {
        "requests": len(outcomes),
        "errors": len(outcomes) - len(answered),
        "latency_p50_s": statistics.median(seconds),
        "latency_mean_s": statistics.fmean(seconds),
        "completion_tokens_per_request": statistics.fmean(o.completion_tokens for o in answered),
        "engine_calls_per_request": statistics.fmean(o.engine_calls or 0 for o in answered),
        "passed": statistics.fmean(float(bool(o.passed)) for o in answered),
    }


def with_ratios(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each variant's latency, tokens and calls as ratios to the group's first variant's."""
    reference = next(iter(rows.values()))
    for row in rows.values():
        for key in ("latency_mean_s", "completion_tokens_per_request", "engine_calls_per_request"):
            row[f"{key}_ratio"] = row[key] / reference[key] if reference[key] else None
    return rows


async def measure(client: openai.AsyncOpenAI, tasks: Sequence[dict[str, Any]]) -> dict[str, Any]:
    report: dict[str, Any] = {}
    for group, variants in GROUPS.items():
        rows = {}
        for configuration in variants:
            outcomes = await run_configuration(client, tasks, configuration, concurrency=1)
            rows[configuration.name] = variant_row(outcomes)
            print(json.dumps({"group": group, "variant": configuration.name, **rows[configuration.name]}), flush=True)
        report[group] = with_ratios(rows)
    return report


@contextmanager
def embedded_gateway(world: Path) -> Iterator[str]:
    """The embedded default on ``world`` in a process of its own; yields its URL."""
    config = yaml.safe_load(resources.files("server").joinpath("embedded.yaml").read_text())
    config |= {"model_root": str(world), "toy_world": False, "limits": {"max_n": 16, "max_best_of_n": 16}}
    with tempfile.TemporaryDirectory() as scratch:
        (Path(scratch) / "alignd.yaml").write_text(yaml.safe_dump(config))
        with LocalGateway(Path(scratch) / "alignd.yaml", Path(scratch) / "alignd.log") as gateway:
            yield gateway.url


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    world = ensure_toy_world(args.world)
    tasks = [json.loads(line) for line in (world / "tasks.jsonl").read_text().splitlines()]
    tasks = [task for task in tasks if task["category"] in KNOWLEDGE][:: args.every][: args.tasks]
    header = {"benchmark": "methods", "tasks": len(tasks), "concurrency": 1}
    if args.host:
        async with openai.AsyncOpenAI(base_url=f"{args.host}/v1", api_key="unused", timeout=600) as client:
            return {**header, "host": args.host, **await measure(client, tasks)}
    with embedded_gateway(world) as url:
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", timeout=600) as client:
            return {**header, "host": "embedded", **await measure(client, tasks)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=16, help="held-out knowledge tasks per variant")
    parser.add_argument("--every", type=int, default=7, help="every k-th of them (spread over the categories)")
    parser.add_argument("--host", help="a running gateway serving the toy world's names (default: start one)")
    parser.add_argument("--world", type=Path, default=Path("~/.cache/alignd/toy-world").expanduser())
    parser.add_argument("--output", type=Path, default=RESULTS / "methods.json")
    run_benchmark(main_async, parser.parse_args())


if __name__ == "__main__":
    main()
