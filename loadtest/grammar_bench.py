"""Per-token decode time: unconstrained vs GCD vs ASAp on the same tiny model, in one run.

For a JSON schema and an EBNF grammar, on the in-process engine (tiny-base): the decode time per token
(model included, so noisy), the grammar processors' own time per token (GCD alone vs ASAp's reweighting
plus GCD, driven with the same random logits), and the ASAp trie's size after 1,000 samples of one key.

    python -m loadtest.grammar_bench

Writes ``loadtest/results/grammar.json``.
"""

from __future__ import annotations

import argparse
import json
import time
import tracemalloc
from pathlib import Path
from typing import Any

import torch

from decoding.grammar import GrammarParams, GrammarService
from loadtest.reporting import RESULTS, run_benchmark
from models.engine import SamplingParams
from models.hf import HFEngine
from models.tiny import ensure_tiny_models

PROMPT = "Answer:"
GRAMMARS = {
    "json_schema": GrammarParams(
        syntax="json_schema",
        grammar=json.dumps(
            {
                "type": "object",
                "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"}},
                "required": ["ok", "n"],
            }
        ),
    ),
    "ebnf": GrammarParams(syntax="ebnf", grammar='root ::= ("yes" | "no") ("," ("yes" | "no"))*'),
}


async def per_token_ms(engine: HFEngine, service: GrammarService, grammar: GrammarParams | None, mode: str,
                       max_tokens: int, samples: int) -> dict[str, float]:  # fmt: skip
    tokenizer = engine.tokenizer
    info = engine.info
    compiler = service.compiler(info.name, tokenizer.hf, info.vocab_size, sorted(info.eos_token_ids))
    prompt_ids = tokenizer.encode(PROMPT)
    seconds, tokens = 0.0, 0
    for seed in range(samples):
        params = SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed)
        if grammar is not None:
            constraint = service.constraint(
                info.name, compiler, grammar.model_copy(update={"mode": mode}), prompt_ids=prompt_ids,
                sampling=params, stop_ids=info.eos_token_ids, in_workers=False,
            )  # fmt: skip
            params = constraint.apply(params)
        started = time.perf_counter()
        completion = await engine.generate(prompt_ids, params)
        seconds += time.perf_counter() - started
        tokens += completion.completion_tokens
    return {"ms_per_token": 1000 * seconds / max(tokens, 1), "tokens": tokens, "samples": samples}


def processor_us_per_token(engine: HFEngine, grammar: GrammarParams, mode: str, max_tokens: int,
                           samples: int) -> dict[str, float]:  # fmt: skip
    """The grammar processors' own time per token, without the model. A stand-in model gives each prefix its
    own random logits (the same prefix, the same logits, as with a real model, so ASAp's trie can converge),
    and the next token is sampled from what the processors leave."""
    service = GrammarService()
    info = engine.info
    compiler = service.compiler(info.name, engine.tokenizer.hf, info.vocab_size, sorted(info.eos_token_ids))
    prompt_ids = engine.tokenizer.encode(PROMPT)
    params = SamplingParams(max_tokens=max_tokens, temperature=1.0)
    constraint = service.constraint(
        info.name, compiler, grammar.model_copy(update={"mode": mode}), prompt_ids=prompt_ids, sampling=params,
        stop_ids=info.eos_token_ids, in_workers=False,
    )  # fmt: skip
    sampler = torch.Generator().manual_seed(0)
    seconds, tokens = 0.0, 0
    for _ in range(samples):
        processors = constraint.make_processor()
        output_ids: list[int] = []
        for _ in range(max_tokens):
            prefix = torch.Generator().manual_seed(hash(tuple(output_ids)) % 2**62)
            logits = 3 * torch.randn(info.vocab_size, generator=prefix)
            started = time.perf_counter()
            shaped = processors(output_ids, logits)
            seconds += time.perf_counter() - started
            token = int(torch.multinomial(torch.softmax(shaped, dim=-1), 1, generator=sampler))
            output_ids.append(token)
            tokens += 1
            if token in info.eos_token_ids:
                break
    return {"us_per_token": 1e6 * seconds / max(tokens, 1), "tokens": tokens, "samples": samples}


async def trie_after(engine: HFEngine, grammar: GrammarParams, samples: int, max_tokens: int) -> dict[str, Any]:
    service = GrammarService()
    info = engine.info
    compiler = service.compiler(info.name, engine.tokenizer.hf, info.vocab_size, sorted(info.eos_token_ids))
    prompt_ids = engine.tokenizer.encode(PROMPT)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    roots = []
    for seed in range(samples):
        params = SamplingParams(max_tokens=max_tokens, seed=seed)
        constraint = service.constraint(
            info.name, compiler, grammar.model_copy(update={"mode": "asap"}), prompt_ids=prompt_ids,
            sampling=params, stop_ids=info.eos_token_ids, in_workers=False,
        )  # fmt: skip
        await engine.generate(prompt_ids, constraint.apply(params))
        assert constraint.trie is not None
        roots.append(constraint.trie.root.efg)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return {
        "samples": samples,
        "trie_nodes": service.store.nodes,
        "traced_memory_mib": used / 2**20,
        "root_efg_first": roots[0],
        "root_efg_last": roots[-1],
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    models = ensure_tiny_models(args.models)
    engine = HFEngine("tiny-base", models / "base")
    report: dict[str, Any] = {"benchmark": "grammar", "max_tokens": args.max_tokens, "samples": args.samples}
    for name, grammar in GRAMMARS.items():
        service = GrammarService()
        free = await per_token_ms(engine, service, None, "gcd", args.max_tokens, args.samples)
        gcd = await per_token_ms(engine, service, grammar, "gcd", args.max_tokens, args.samples)
        asap = await per_token_ms(engine, service, grammar, "asap", args.max_tokens, args.samples)
        report[name] = {
            "unconstrained": free,
            "gcd": gcd,
            "asap": asap,
            "gcd_over_unconstrained": gcd["ms_per_token"] / free["ms_per_token"],
            "asap_over_unconstrained": asap["ms_per_token"] / free["ms_per_token"],
        }
        gcd_own = processor_us_per_token(engine, grammar, "gcd", args.max_tokens, args.processor_samples)
        asap_own = processor_us_per_token(engine, grammar, "asap", args.max_tokens, args.processor_samples)
        report[name]["processors"] = {"gcd": gcd_own, "asap": asap_own,
                                      "asap_over_gcd": asap_own["us_per_token"] / gcd_own["us_per_token"]}  # fmt: skip
        print(json.dumps({name: report[name]}, default=round))
    report["trie_ebnf"] = await trie_after(engine, GRAMMARS["ebnf"], args.trie_samples, 16)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--trie-samples", type=int, default=1000)
    parser.add_argument("--processor-samples", type=int, default=200, help="sequences per mode, processors alone")
    parser.add_argument("--models", type=Path, default=Path("~/.cache/alignd/tiny-models").expanduser())
    parser.add_argument("--output", type=Path, default=RESULTS / "grammar.json")
    run_benchmark(main_async, parser.parse_args())


if __name__ == "__main__":
    main()
