"""Nudging and Transfer-Q* costs on vLLM CPU workers, side by side in one run.

- Nudging (tiny-base + tiny-chat, greedy, gamma 0.4): wall time vs a base-only
  generation of the same number of tokens (ratio), and engine calls per 100 output
  tokens; with vLLM's prefix caching on and off.
- Transfer-Q* (tiny-base + tiny-chat-shared, top_k 10, rollout_tokens 20): decision
  steps per second with batched rollouts (one call for all candidates) vs one call
  per candidate (sequential, as the reference code, and concurrent).

    python -m loadtest.strategies_bench

Writes ``loadtest/results/strategies.json``. The tiny models are random, so the
nudged fraction is not meaningful; the engine-call accounting and ratios are.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from decoding.base import plain_text_prompt
from decoding.nudging import Nudging, NudgingParams
from decoding.transfer_q import TransferQ, TransferQParams
from decoding.usage import MeteredEngine, UsageMeter
from models.engine import Completion, Engine, Prompt, SamplingParams
from models.scorers import HFRewardScorer
from models.tiny import ensure_tiny_models
from models.tokenizer import Tokenizer
from models.vllm_engine import VLLMEngine
from models.vllm_service import VLLMService
from models.workers import Supervision, WorkerSpec

RESULTS = Path(__file__).parent / "results"
QUESTIONS = [
    "How do I sort a list in Python?",
    "What is the capital of France?",
    "Give me three tips for better sleep.",
    "Explain what a hash table is.",
]
CPU = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}


async def launch(models: Path, name: str, logs: Path, *extra: str) -> VLLMEngine:
    spec = WorkerSpec(
        name=name,
        model_path=models / name,
        served_name=name,
        args=("--dtype", "float32", "--max-model-len", "1024", "--enforce-eager", "--max-logprobs", "20", *extra),
        env=CPU,
    )
    service = await VLLMService.launch(spec, 1, supervision=Supervision(startup_timeout_s=300), log_dir=logs)
    return await VLLMEngine.create(
        name, Tokenizer(models / name, name=name), service, served_name=name, max_logprobs=20
    )


async def nudging_run(base: Engine, nudger: Engine, max_tokens: int) -> dict[str, Any]:
    params = NudgingParams(nudger="chat", gamma=0.4)
    walls, base_walls, calls, tokens, fractions = [], [], [], [], []
    for question in QUESTIONS:
        messages = [{"role": "user", "content": question}]
        meter = UsageMeter()
        metered_base, metered_nudger = MeteredEngine(base, meter), MeteredEngine(nudger, meter)
        nudger_prompt = nudger.tokenizer.render_chat(messages)
        run = Nudging(
            metered_base, metered_nudger,
            base_prompt_ids=base.tokenizer.encode(plain_text_prompt(messages)),
            nudger_prompt_ids=nudger.tokenizer.encode(nudger_prompt, add_special_tokens=False),
            params=params, max_tokens=max_tokens,
        )  # fmt: skip
        started = time.perf_counter()
        text, _, details = await run.run()
        walls.append(time.perf_counter() - started)
        produced = len(base.tokenizer.encode(text, add_special_tokens=False))
        tokens.append(produced)
        calls.append(meter.engine_calls)
        fractions.append(details.nudged_token_fraction)
        started = time.perf_counter()
        await base.generate(plain_text_prompt(messages), SamplingParams(max_tokens=max(produced, 1), temperature=0))
        base_walls.append(time.perf_counter() - started)
    return {
        "requests": len(QUESTIONS),
        "nudging_wall_s_mean": statistics.fmean(walls),
        "base_only_wall_s_mean": statistics.fmean(base_walls),
        "wall_ratio_nudging_over_base_only": sum(walls) / sum(base_walls),
        "engine_calls_per_100_tokens": 100 * sum(calls) / max(sum(tokens), 1),
        "output_tokens_mean": statistics.fmean(tokens),
        "nudged_token_fraction_mean": statistics.fmean(fractions),
    }


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


async def transfer_q_run(base: Engine, baseline: Any, reward: HFRewardScorer, max_tokens: int) -> dict[str, Any]:
    params = TransferQParams(baseline="baseline", reward="rm", top_k=10, rollout_tokens=20)
    steps, wall = 0, 0.0
    for question in QUESTIONS:
        prompt = plain_text_prompt([{"role": "user", "content": question}])
        run = TransferQ(
            base, baseline, reward, params,
            prompt_ids=base.tokenizer.encode(prompt), prompt_text=prompt, max_tokens=max_tokens,
        )  # fmt: skip
        started = time.perf_counter()
        *_, details = await run.run()
        wall += time.perf_counter() - started
        steps += details.decision_steps
    return {"decision_steps": steps, "wall_s": wall, "decision_steps_per_s": steps / wall}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    models = ensure_tiny_models(args.models)
    report: dict[str, Any] = {"benchmark": "strategies", "max_tokens": args.max_tokens}
    with tempfile.TemporaryDirectory() as logs:
        for caching, flag in (("prefix_caching_on", ()), ("prefix_caching_off", ("--no-enable-prefix-caching",))):
            base = await launch(models, "base", Path(logs), *flag)
            chat = await launch(models, "chat", Path(logs), *flag)
            try:
                report[f"nudging_{caching}"] = await nudging_run(base, chat, args.max_tokens)
            finally:
                await asyncio.gather(base.close(), chat.close())
        base = await launch(models, "base", Path(logs))
        baseline = await launch(models, "chat-shared", Path(logs))
        reward = HFRewardScorer("rm", models / "reward")
        try:
            tq_tokens = args.transfer_q_tokens
            batched = await transfer_q_run(base, baseline, reward, tq_tokens)
            sequential = await transfer_q_run(base, OneCallPerCandidate(baseline, concurrent=False), reward, tq_tokens)
            concurrent = await transfer_q_run(base, OneCallPerCandidate(baseline, concurrent=True), reward, tq_tokens)
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
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--transfer-q-tokens", type=int, default=8)
    parser.add_argument("--models", type=Path, default=Path("~/.cache/alignd/tiny-models").expanduser())
    parser.add_argument("--output", type=Path, default=RESULTS / "strategies.json")
    args = parser.parse_args()
    report = asyncio.run(main_async(args))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
