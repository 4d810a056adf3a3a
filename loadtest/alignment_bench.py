"""Best-of-N and guideline retrieval costs, side by side in one run.

- best-of-8 as one ``n=8`` engine call vs 8 sequential calls and vs a single sample (in-process engine,
  and a managed vLLM CPU worker unless ``--no-vllm``);
- scoring 8 responses in one batched call vs one call per response (in-process reward model);
- guideline retrieval latency p50/p99 over the default library.

    python -m loadtest.alignment_bench

Writes ``loadtest/results/alignment.json``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from decoding.guidelines import DEFAULT_LIBRARY, GuidelineLibrary, GuidelinesParams
from loadtest.reporting import RESULTS, run_benchmark
from models.embedder import SentenceEmbedder
from models.engine import Engine, SamplingParams
from models.hf import HFEngine
from models.scorers import HFRewardScorer
from models.tiny import ensure_tiny_models

PROMPT = "Question: how do I sort a list in Python?\nAnswer:"


async def timed(action: Callable[[], Awaitable[Any]], repeats: int) -> list[float]:
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        await action()
        seconds.append(time.perf_counter() - started)
    return seconds


def summary(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)
    return {
        "p50_ms": 1000 * statistics.median(ordered),
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))],
        "mean_ms": 1000 * statistics.fmean(ordered),
    }


async def best_of_n_calls(engine: Engine, n: int, max_tokens: int, repeats: int) -> dict[str, Any]:
    params = SamplingParams(max_tokens=max_tokens, temperature=1.0)

    async def one_call() -> None:
        await engine.generate(PROMPT, SamplingParams(max_tokens=max_tokens, temperature=1.0, n=n))

    async def single_sample() -> None:
        await engine.generate(PROMPT, params)

    async def sequential() -> None:
        for _ in range(n):
            await single_sample()

    await one_call()  # warm-up
    batched, separate = await timed(one_call, repeats), await timed(sequential, repeats)
    single = await timed(single_sample, repeats)
    return {
        "one_call_n": summary(batched),
        "sequential_calls": summary(separate),
        "single_sample": summary(single),
        "time_ratio_sequential_over_one_call": statistics.median(separate) / statistics.median(batched),
        # What best-of-N costs in wall time over plain sampling, scoring aside.
        "time_ratio_one_call_over_single_sample": statistics.median(batched) / statistics.median(single),
    }


async def scoring(scorer: HFRewardScorer, n: int, repeats: int) -> dict[str, Any]:
    pairs = [(PROMPT, f" Use sorted(items) or items.sort(); variant {i}.") for i in range(n)]

    async def batched() -> None:
        await scorer.score(pairs)

    async def one_by_one() -> None:
        for pair in pairs:
            await scorer.score([pair])

    await batched()
    together, apart = await timed(batched, repeats), await timed(one_by_one, repeats)
    return {
        "batched": summary(together),
        "one_by_one": summary(apart),
        "time_ratio_one_by_one_over_batched": statistics.median(apart) / statistics.median(together),
    }


def retrieval(library: GuidelineLibrary, repeats: int) -> dict[str, Any]:
    queries = [trigger for guideline in library.guidelines for trigger in guideline.triggers][:repeats]
    params = GuidelinesParams()
    seconds = []
    for query in queries:
        started = time.perf_counter()
        library.retrieve(query, params)
        seconds.append(time.perf_counter() - started)
    return {"queries": len(queries), "guidelines": len(library.guidelines), **summary(seconds)}


async def vllm_engine(models: Path, logs: Path) -> Engine:
    from models.tokenizer import Tokenizer
    from models.vllm_engine import VLLMEngine
    from models.vllm_service import VLLMService
    from models.workers import Supervision, WorkerSpec

    spec = WorkerSpec(
        name="tiny-base",
        model_path=models / "base",
        served_name="tiny-base",
        args=("--dtype", "float32", "--max-model-len", "1024", "--enforce-eager"),
        env={"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"},
    )
    service = await VLLMService.launch(spec, 1, supervision=Supervision(startup_timeout_s=300), log_dir=logs)
    tokenizer = Tokenizer(models / "base", name="tiny-base")
    return await VLLMEngine.create("tiny-base", tokenizer, service, served_name="tiny-base", max_logprobs=20)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    models = ensure_tiny_models(args.models)
    report: dict[str, Any] = {"benchmark": "alignment", "n": args.n, "max_tokens": args.max_tokens}
    engine = HFEngine("tiny-base", models / "base")
    report["best_of_n_hf"] = await best_of_n_calls(engine, args.n, args.max_tokens, args.repeats)
    report["scoring_hf"] = await scoring(HFRewardScorer("rm", models / "reward"), args.n, args.repeats)
    if args.vllm:
        with tempfile.TemporaryDirectory() as logs:
            remote = await vllm_engine(models, Path(logs))
            try:
                report["best_of_n_vllm"] = await best_of_n_calls(remote, args.n, args.max_tokens, args.repeats)
            finally:
                await remote.close()
    embedder = SentenceEmbedder(cache_dir=Path("~/.cache/alignd/embeddings").expanduser())
    report["guideline_retrieval"] = retrieval(GuidelineLibrary.load("default", DEFAULT_LIBRARY, embedder), 200)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-vllm", dest="vllm", action="store_false")
    parser.add_argument("--models", type=Path, default=Path("~/.cache/alignd/tiny-models").expanduser())
    parser.add_argument("--output", type=Path, default=RESULTS / "alignment.json")
    run_benchmark(main_async, parser.parse_args())


if __name__ == "__main__":
    main()
