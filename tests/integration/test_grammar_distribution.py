"""ASAp samples the grammar-conditioned distribution through HTTP, on the tiny base model with its real tokenizer.

The target ``Q(w) ∝ P(w | prompt) · 1[w ∈ L]`` is enumerated exactly: every token sequence that spells
a sentence of the (small) language, followed by EOS, scored by forward passes of the same model the
server runs. ASAp's samples must pass a chi-square test against it, for one sequence per request,
eight per request (one batch, one trie), and best-of-N's candidates; GCD's must fail the same test.

ASAp is exact only once its trie has learned: each of the ~30 token paths to a sentence is
over-sampled until it is first visited, so ``BURN_IN`` samples come first and are not counted.
Sentences whose expected count is below 5 are pooled into one bin, as a chi-square test needs.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from scipy.stats import chisquare
from transformers import AutoModelForCausalLM, AutoTokenizer

from evaluation.gateway import LocalGateway

PROMPT = "import"
GRAMMAR = 'root ::= ("s" | "e") ("s" | "e") ("s" | "e")?'
LANGUAGE = ["".join(w) for k in (2, 3) for w in itertools.product("se", repeat=k)]
SAMPLES, BURN_IN = 1600, 400
P_ASAP, P_GCD = 1e-3, 1e-6


@pytest.fixture(scope="module")
def target(tiny_models: Path) -> dict[str, float]:
    return grammar_target(tiny_models / "base")


def grammar_target(path: Path) -> dict[str, float]:
    """Q over the language's sentences (summed over their tokenisations)."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    spelled = {token: i for token, i in tokenizer.get_vocab().items() if token and set(token) <= set("se")}
    eos = tokenizer.eos_token_id

    @cache
    def next_logprobs(ids: tuple[int, ...]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([list(ids)])).logits[0, -1].double(), dim=-1)

    mass: Counter[str] = Counter()

    def walk(ids: tuple[int, ...], text: str, logp: float) -> None:
        if text in LANGUAGE:
            mass[text] += math.exp(logp + float(next_logprobs(ids)[eos]))
        for token, token_id in spelled.items():
            longer = text + token
            if any(sentence.startswith(longer) for sentence in LANGUAGE):
                walk((*ids, token_id), longer, logp + float(next_logprobs(ids)[token_id]))

    walk(tuple(tokenizer.encode(PROMPT)), "", 0.0)
    total = sum(mass.values())
    return {sentence: mass[sentence] / total for sentence in LANGUAGE}


def reset(server: LocalGateway) -> None:
    assert httpx.delete(f"{server.url}/admin/grammar/tries", timeout=30).status_code == 200


def sample(
    client: openai.OpenAI, mode: str, count: int, *, n: int, best_of: int | None = None, first_seed: int = 0
) -> Counter[str]:
    """``count`` sentences: the choices' texts, or every candidate of best-of-N (from the details)."""
    alignment: dict[str, Any] = {"grammar": {"syntax": "ebnf", "grammar": GRAMMAR, "mode": mode}}
    if best_of is not None:
        alignment |= {"best_of_n": {"n": best_of, "reward": "rm"}, "return_details": True}
    per_request = best_of or n
    counts: Counter[str] = Counter()
    for seed in range(first_seed, first_seed + count // per_request):
        completion = client.completions.create(
            model="tiny-base", prompt=PROMPT, max_tokens=8, n=n, seed=seed, extra_body={"alignment": alignment}
        )
        if best_of is None:
            counts.update(choice.text for choice in completion.choices)
        else:
            details = (completion.choices[0].model_extra or {})["alignment"]["best_of_n"]
            counts.update(candidate["text"] for candidate in details["candidates"])
    return counts


def p_value(counts: Counter[str], target: dict[str, float]) -> float:
    assert set(counts) <= set(LANGUAGE), counts  # every output is a sentence
    trials = sum(counts.values())
    common = [w for w in LANGUAGE if target[w] * trials >= 5]
    rare = [w for w in LANGUAGE if w not in common]
    observed = [counts[w] for w in common] + [sum(counts[w] for w in rare)]
    expected = [target[w] * trials for w in common] + [sum(target[w] for w in rare) * trials]
    return float(chisquare(observed, expected).pvalue)


@pytest.mark.parametrize(("n", "best_of"), [(1, None), (8, None), (1, 8)], ids=["n=1", "n=8", "best-of-8"])
def test_asap_matches_the_grammar_conditioned_distribution_and_gcd_does_not(
    server: LocalGateway, client: openai.OpenAI, target: dict[str, float], n: int, best_of: int | None
):
    reset(server)
    sample(client, "asap", BURN_IN, n=n, best_of=best_of)
    asap = p_value(sample(client, "asap", SAMPLES, n=n, best_of=best_of, first_seed=10_000), target)
    gcd = p_value(sample(client, "gcd", SAMPLES, n=n, best_of=best_of, first_seed=20_000), target)
    print(f"chi-square p: ASAp {asap:.3g}, GCD {gcd:.3g}")
    assert asap > P_ASAP and gcd < P_GCD


def test_a_language_of_tiny_mass_keeps_being_served(server: LocalGateway, client: openai.OpenAI):
    """P(L) is far below float64's resolution near 1: the learned bound must not cancel to 0."""
    reset(server)
    roots = []
    for seed in range(30):
        completion = client.completions.create(
            model="tiny-base",
            prompt="Answer:",
            max_tokens=8,
            seed=seed,
            extra_body={"alignment": {"grammar": {"grammar": 'root ::= "xxxxxx" | "yyyyyy"'}, "return_details": True}},
        )
        choice = completion.choices[0]
        grammar = (choice.model_extra or {})["alignment"]["grammar"]
        assert choice.text in ("xxxxxx", "yyyyyy") and choice.finish_reason == "stop" and grammar["complete"]
        roots.append(grammar["root_efg"])
    assert 0 < roots[-1] <= roots[0] and roots == sorted(roots, reverse=True)
    listed = httpx.get(f"{server.url}/admin/grammar/tries", timeout=30).json()["data"]
    assert any(entry["key"] == grammar["trie_key"] and entry["log_root_efg"] < -37 for entry in listed)
