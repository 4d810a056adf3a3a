"""Nudging and Transfer-Q* costs on the toy world's models behind vLLM CPU workers, side by side in one run.

- Nudging (toy-base nudged by toy-nudger, greedy, gamma 0.4, on held-out toy-world questions): wall time vs a
  base-only generation of the same number of tokens (ratio), engine calls per 100 output tokens, the nudged
  token fraction and the task checker's pass rate (nudged and base alone); with vLLM's prefix caching on
  and off, and base chunks of 16 tokens (the default) and 64.
- Transfer-Q* (toy-base, toy-baseline, toy-rm; top_k 10, rollout_tokens 20): decision steps per second with
  batched rollouts (one call for all candidates) vs one call per candidate (sequential, as the reference
  code, and concurrent), and the reward of its answers.

    python -m loadtest.strategies_bench

Builds the toy world first if it is not cached. Writes ``loadtest/results/strategies.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from decoding.base import NEXT_TURN
from decoding.nudging import Nudging, NudgingParams
from decoding.transfer_q import TransferQ, TransferQParams
from decoding.usage import MeteredEngine, UsageMeter
from evaluation.checkers import check
from loadtest.reporting import RESULTS, run_benchmark
from loadtest.stacks import CPU_WORKER
from models.engine import Completion, Engine, Prompt, SamplingParams
from models.scorers import HFRewardScorer
from models.tokenizer import Tokenizer
from models.vllm_engine import VLLMEngine
from models.vllm_service import VLLMService
from models.workers import Supervision, WorkerSpec
from toyworld.build import ensure_toy_world

# Held-out questions whose answers the base knows: nudging's setting (content from the base, style from the nudger).
KNOWLEDGE = ("capital", "country", "birth-year", "sum")


async def launch(models: Path, name: str, logs: Path, *extra: str) -> VLLMEngine:
    spec = WorkerSpec(
        name=name,
        model_path=models / name,
        served_name=name,
        args=("--dtype", "float32", "--max-model-len", "1024", "--enforce-eager", "--max-logprobs", "20", *extra),
        env=CPU_WORKER["env"],
        # As in the vllm-cpu stack: every worker on CPU 0 (unpinned, two busy-polling engines stall the machine).
        cpus=tuple(CPU_WORKER["cpus"]),
    )
    service = await VLLMService.launch(spec, 1, supervision=Supervision(startup_timeout_s=300), log_dir=logs)
    return await VLLMEngine.create(
        name, Tokenizer(models / name, name=name), service, served_name=name, max_logprobs=20
    )


async def nudging_run(
    base: Engine, nudger: Engine, tasks: Sequence[Mapping[str, Any]], max_tokens: int, base_chunk_tokens: int
) -> dict[str, Any]:
    params = NudgingParams(nudger=nudger.info.name, gamma=0.4, base_chunk_tokens=base_chunk_tokens)
    walls, base_walls, calls, tokens, nudged_tokens = [], [], [], [], []
    passed, base_passed, nudged_words = [], [], Counter[str]()
    for task in tasks:
        messages = task["messages"]
        meter = UsageMeter()
        metered_base, metered_nudger = MeteredEngine(base, meter), MeteredEngine(nudger, meter)
        nudger_prompt = nudger.tokenizer.render_chat(messages)
        run = Nudging(
            metered_base, metered_nudger,
            base_prompt_ids=base.tokenizer.encode(task["prompt"]),
            nudger_prompt_ids=nudger.tokenizer.encode(nudger_prompt, add_special_tokens=False),
            params=params, max_tokens=max_tokens, stop=(NEXT_TURN,),
        )  # fmt: skip
        started = time.perf_counter()
        text, _, details = await run.run()
        walls.append(time.perf_counter() - started)
        produced = len(base.tokenizer.encode(text, add_special_tokens=False))
        tokens.append(produced)
        calls.append(meter.engine_calls)
        nudged_tokens.append(details.nudged_token_fraction * produced)
        nudged = [span.text for span in details.spans if span.source == nudger.info.name]
        nudged_words.update(word for piece in nudged for word in piece.split())
        passed.append(check(task, text))
        started = time.perf_counter()
        alone = await base.generate(task["prompt"], SamplingParams(max_tokens=max(produced, 1), temperature=0))
        base_walls.append(time.perf_counter() - started)
        base_passed.append(check(task, _before_next_turn(alone.samples[0].text)))
    return {
        "requests": len(tasks),
        "base_chunk_tokens": base_chunk_tokens,
        "nudging_wall_s_mean": statistics.fmean(walls),
        "base_only_wall_s_mean": statistics.fmean(base_walls),
        "wall_ratio_nudging_over_base_only": sum(walls) / sum(base_walls),
        "engine_calls_per_100_tokens": 100 * sum(calls) / max(sum(tokens), 1),
        "output_tokens_mean": statistics.fmean(tokens),
        "nudged_token_fraction": sum(nudged_tokens) / max(sum(tokens), 1),
        "most_nudged_words": nudged_words.most_common(8),
        "pass_rate_nudged": statistics.fmean(passed),
        "pass_rate_base_only": statistics.fmean(base_passed),
    }


def _before_next_turn(text: str) -> str:
    return text.split(NEXT_TURN, 1)[0]


class CountedCalls:
    """An engine whose calls (one sample, a batch) are counted."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    async def generate(self, prompt: Prompt, params: SamplingParams) -> Completion:
        self.calls += 1
        return await self.engine.generate(prompt, params)

    async def generate_batch(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[Completion]:
        self.calls += 1
        return await self.engine.generate_batch(prompts, params)


class OneCallPerCandidate:
    """The baseline engine, but rollouts go out as one call per candidate."""

    def __init__(self, engine: Engine, *, concurrent: bool) -> None:
        self.engine = engine
        self.concurrent = concurrent

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    async def generate_batch(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[Completion]:
        if self.concurrent:
            return list(await asyncio.gather(*(self.engine.generate(p, params) for p in prompts)))
        return [await self.engine.generate(p, params) for p in prompts]


async def transfer_q_run(
    base: CountedCalls,
    baseline: Any,
    reward: HFRewardScorer,
    tasks: Sequence[Mapping[str, Any]],
    max_tokens: int,
    counted: Sequence[CountedCalls],
) -> dict[str, Any]:
    """Transfer-Q* over ``tasks``; ``counted``: the engines whose calls make up its engine calls."""
    params = TransferQParams(baseline="toy-baseline", reward="toy-rm", top_k=10, rollout_tokens=20)
    for engine in counted:
        engine.calls = 0
    steps, wall, answers = 0, 0.0, []
    for task in tasks:
        prompt = task["prompt"]
        run = TransferQ(
            base, baseline, reward, params,
            prompt_ids=base.tokenizer.encode(prompt), prompt_text=prompt, max_tokens=max_tokens,
        )  # fmt: skip
        started = time.perf_counter()
        _, text, _, details = await run.run()
        wall += time.perf_counter() - started
        steps += details.decision_steps
        answers.append((prompt, text))
    rewards = await reward.score(answers)
    calls = sum(engine.calls for engine in counted)
    return {"decision_steps": steps, "wall_s": wall, "decision_steps_per_s": steps / wall,
            "engine_calls_per_decision_step": calls / max(steps, 1),
            "reward_mean": statistics.fmean(rewards)}  # fmt: skip


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    world = ensure_toy_world(args.world)
    tasks = [json.loads(line) for line in (world / "tasks.jsonl").read_text().splitlines()]
    tasks = [task for task in tasks if task["category"] in KNOWLEDGE][:: args.every]
    report: dict[str, Any] = {"benchmark": "strategies", "world": str(world), "max_tokens": args.max_tokens}
    with tempfile.TemporaryDirectory() as logs:
        for caching, flag in (("prefix_caching_on", ()), ("prefix_caching_off", ("--no-enable-prefix-caching",))):
            base = await launch(world, "base", Path(logs), *flag)
            nudger = await launch(world, "nudger", Path(logs), *flag)
            try:
                report[f"nudging_{caching}"] = await nudging_run(base, nudger, tasks, args.max_tokens, 16)
                # One base call can write a whole confident answer: fewer calls, the rest of a cut chunk wasted.
                long = await nudging_run(base, nudger, tasks, args.max_tokens, 64)
                report[f"nudging_{caching}_base_chunk_64"] = long
            finally:
                await asyncio.gather(base.close(), nudger.close())
        base = CountedCalls(await launch(world, "base", Path(logs)))
        baseline = CountedCalls(await launch(world, "baseline", Path(logs)))
        reward = HFRewardScorer("toy-rm", world / "reward")
        try:
            few, tq_tokens, counted = tasks[: args.transfer_q_tasks], args.transfer_q_tokens, (base, baseline)
            batched = await transfer_q_run(base, baseline, reward, few, tq_tokens, counted)
            one_by_one = OneCallPerCandidate(baseline, concurrent=False)
            sequential = await transfer_q_run(base, one_by_one, reward, few, tq_tokens, counted)
            at_once = OneCallPerCandidate(baseline, concurrent=True)
            concurrent = await transfer_q_run(base, at_once, reward, few, tq_tokens, counted)
            report["transfer_q"] = {
                "top_k": 10,
                "rollout_tokens": 20,
                "batched_rollouts": batched,
                "one_call_per_candidate_sequential": sequential,
                "one_call_per_candidate_concurrent": concurrent,
                "speedup_batched_over_sequential": batched["decision_steps_per_s"] / sequential["decision_steps_per_s"],
                "speedup_batched_over_concurrent": batched["decision_steps_per_s"] / concurrent["decision_steps_per_s"],
            }
        finally:
            await asyncio.gather(base.close(), baseline.close(), reward.close())
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=40)
    parser.add_argument("--every", type=int, default=4, help="every k-th held-out knowledge task")
    parser.add_argument("--transfer-q-tasks", type=int, default=8)
    parser.add_argument("--transfer-q-tokens", type=int, default=16)
    parser.add_argument("--world", type=Path, default=Path("~/.cache/alignd/toy-world").expanduser())
    parser.add_argument("--output", type=Path, default=RESULTS / "strategies.json")
    run_benchmark(main_async, parser.parse_args())


if __name__ == "__main__":
    main()
