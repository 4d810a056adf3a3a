"""ASAp and GCD on the exact toy of METHODS.md §4, with real xgrammar masks.

Vocabulary {0, 1, $} ($ ends a sentence); the language is {00000} or 1{0,1}^4, each followed
by $; the LM is a table of next-token probabilities, so Q(w) ∝ P(w)·1[w ∈ L] is enumerable.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter

import pytest
import torch
import xgrammar
from scipy.stats import chisquare

from decoding.alignment import parse_alignment
from decoding.base import Limits, PromptInput
from decoding.grammar import (
    WORKER_ARG,
    EFGStore,
    EFGTrie,
    GrammarCompiler,
    GrammarConstraint,
    GrammarLogitsProcessor,
    GrammarParams,
    GrammarService,
)
from decoding.guidelines import GuidelineRetriever
from decoding.pipeline import AlignedRequest, Pipeline
from models.engine import SamplingParams
from models.errors import InvalidRequestError, UpstreamError
from tests.fakes import CategoricalEngine, FakeResources

STOP = 2
GRAMMAR = GrammarParams(syntax="ebnf", grammar='root ::= "00000" | "1" [01] [01] [01] [01]')
MAX_TOKENS = 6


def lm(prefix: tuple[int, ...]) -> list[float]:
    """P(next | prefix) over (0, 1, $)."""
    if not prefix:
        return [0.7, 0.3, 0.0]
    if len(prefix) < 5:
        return [0.45, 0.45, 0.1] if prefix[0] == 0 else [0.3, 0.6, 0.1]
    return [0.1, 0.1, 0.8]


def compiled() -> xgrammar.CompiledGrammar:
    info = xgrammar.TokenizerInfo(["0", "1", "</s>"], stop_token_ids=[STOP])
    return GrammarCompiler(info, vocab_size=3, stop_ids=[STOP]).compile(GRAMMAR)


COMPILED = compiled()
LANGUAGE = [(0, 0, 0, 0, 0, STOP)] + [(1, *tail, STOP) for tail in itertools.product((0, 1), repeat=4)]


def probability(sentence: tuple[int, ...]) -> float:
    return math.prod(lm(sentence[:i])[token] for i, token in enumerate(sentence))


P_L = sum(probability(w) for w in LANGUAGE)
Q = {w: probability(w) / P_L for w in LANGUAGE}


def true_c(prefix: tuple[int, ...]) -> float:
    """Expected future grammaticality: P(a completion of prefix is in L | prefix)."""
    return sum(probability(w) for w in LANGUAGE if w[: len(prefix)] == prefix) / probability(prefix)


def processor(trie: EFGTrie | None) -> GrammarLogitsProcessor:
    return GrammarLogitsProcessor(COMPILED, vocab_size=3, max_tokens=MAX_TOKENS, trie=trie)


def step_distribution(proc: GrammarLogitsProcessor, prefix: tuple[int, ...]) -> torch.Tensor:
    logits = torch.log(torch.tensor(lm(prefix), dtype=torch.float64).clamp_min(1e-300))
    return torch.softmax(proc(list(prefix), logits), dim=-1)


def sample(trie: EFGTrie | None, rng: random.Random) -> tuple[int, ...]:
    proc, prefix = processor(trie), ()
    while len(prefix) < MAX_TOKENS:
        token = rng.choices(range(3), weights=step_distribution(proc, prefix).tolist())[0]
        prefix = (*prefix, token)
        if token == STOP:
            break
    return prefix


def exact_distribution(make_trie) -> dict[tuple[int, ...], float]:  # type: ignore[no-untyped-def]
    """The sampler's distribution over sentences, by enumerating every path (a fresh processor each)."""
    result: dict[tuple[int, ...], float] = {}

    def walk(prefix: tuple[int, ...], mass: float) -> None:
        proc = processor(make_trie())
        for i in range(len(prefix) + 1):
            distribution = step_distribution(proc, prefix[:i])
        for token, p in enumerate(distribution.tolist()):
            if p <= 0:
                continue
            path = (*prefix, token)
            if token == STOP or len(path) == MAX_TOKENS:
                result[path] = result.get(path, 0.0) + mass * p
            else:
                walk(path, mass * p)

    walk((), 1.0)
    return result


def gcd_distribution() -> dict[tuple[int, ...], float]:
    return exact_distribution(lambda: None)


def test_an_empty_trie_samples_exactly_like_gcd():
    asap = exact_distribution(EFGTrie)
    gcd = gcd_distribution()
    assert set(asap) == set(gcd) == set(LANGUAGE)
    assert [asap[w] for w in LANGUAGE] == pytest.approx([gcd[w] for w in LANGUAGE], abs=1e-12)
    assert [gcd[w] for w in LANGUAGE] != pytest.approx([Q[w] for w in LANGUAGE], abs=1e-3)  # GCD is biased


def oracle_trie() -> EFGTrie:
    """Every prefix that can occur, with its true EFG plugged in."""
    trie = EFGTrie()

    def grow(node, prefix: tuple[int, ...]) -> None:  # type: ignore[no-untyped-def]
        node.efg = true_c(prefix) if prefix else P_L
        if len(prefix) == MAX_TOKENS or (prefix and prefix[-1] == STOP):
            return
        for token, p in enumerate(lm(prefix)):
            path = (*prefix, token)
            if p > 0 and any(w[: len(path)] == path for w in LANGUAGE):
                grow(trie.child(node, token, p), path)

    grow(trie.root, ())
    return trie


def test_with_the_true_c_the_sampler_is_q():
    trie = oracle_trie()
    sampler = exact_distribution(lambda: trie)
    assert [sampler.get(w, 0.0) for w in LANGUAGE] == pytest.approx([Q[w] for w in LANGUAGE], abs=1e-9)


def nodes(trie: EFGTrie):  # type: ignore[no-untyped-def]
    stack = [(trie.root, ())]
    while stack:
        node, prefix = stack.pop()
        yield node, prefix
        stack.extend((child, (*prefix, token)) for token, (_, child) in node.children.items())


def test_efg_stays_an_upper_bound_and_the_root_falls_to_p_l():
    trie, rng = EFGTrie(), random.Random(0)
    previous_root = 1.0
    for _ in range(400):
        sample(trie, rng)
        for node, prefix in nodes(trie):
            if prefix and prefix[-1] != STOP:
                assert node.efg >= true_c(prefix) - 1e-9
        assert trie.root.efg <= previous_root + 1e-12
        previous_root = trie.root.efg
    assert trie.root.efg == pytest.approx(P_L, abs=1e-9)


def chi_square_p(counts: Counter, trials: int) -> float:
    return float(chisquare([counts[w] for w in LANGUAGE], [Q[w] * trials for w in LANGUAGE]).pvalue)


def test_after_burn_in_asap_matches_q_and_gcd_does_not():
    trie, rng = EFGTrie(), random.Random(1)
    for _ in range(300):
        sample(trie, rng)
    trials = 4000
    asap = Counter(sample(trie, rng) for _ in range(trials))
    gcd = Counter(sample(None, rng) for _ in range(trials))
    assert chi_square_p(asap, trials) > 1e-3
    assert chi_square_p(gcd, trials) < 1e-6


def test_every_sample_is_in_the_language():
    rng = random.Random(2)
    for trie in (None, EFGTrie()):
        assert all(sample(trie, rng) in LANGUAGE for _ in range(200))


def test_store_is_bounded_and_keeps_recent_keys():
    store = EFGStore(max_nodes=20)
    for key in ("a", "b", "c"):
        trie = store.trie(key)
        for _ in range(50):
            sample(trie, random.Random(key))
    assert store.nodes > 20
    store.trie("d")  # the budget is enforced when a trie is fetched: least recently used first
    assert store.nodes <= 20
    assert "a" not in store and "c" in store and "d" in store


@pytest.mark.parametrize(
    ("syntax", "grammar"),
    [("ebnf", "root ::= "), ("json_schema", '{"type": "objec"}'), ("regex", "a(b"), ("lark", "start: ???")],
)
def test_bad_grammars_are_400s_with_the_compilers_message(syntax: str, grammar: str):
    info = xgrammar.TokenizerInfo(["0", "1", "</s>"], stop_token_ids=[STOP])
    compiler = GrammarCompiler(info, vocab_size=3, stop_ids=[STOP])
    with pytest.raises(InvalidRequestError) as info_error:
        compiler.compile(GrammarParams(syntax=syntax, grammar=grammar))  # type: ignore[arg-type]
    assert info_error.value.param == "alignment.grammar.grammar" and "does not compile" in info_error.value.message


def test_oversized_grammars_are_rejected():
    info = xgrammar.TokenizerInfo(["0", "1", "</s>"], stop_token_ids=[STOP])
    compiler = GrammarCompiler(info, vocab_size=3, stop_ids=[STOP], max_grammar_bytes=10)
    with pytest.raises(InvalidRequestError, match="at most 10"):
        compiler.compile(GRAMMAR)


# Where the grammar runs, and what the gateway learns from each output --------------------------


def toy_constraint(mode: str, *, in_workers: bool) -> GrammarConstraint:
    info = xgrammar.TokenizerInfo(["0", "1", "</s>"], stop_token_ids=[STOP])
    compiler = GrammarCompiler(info, vocab_size=3, stop_ids=[STOP])
    return GrammarService().constraint(
        "toy", compiler, GRAMMAR.model_copy(update={"mode": mode}), prompt_ids=[0],
        sampling=SamplingParams(max_tokens=MAX_TOKENS), stop_ids=frozenset({STOP}), in_workers=in_workers,
    )  # fmt: skip


def test_in_workers_the_grammar_travels_as_vllm_xargs_and_asap_pins_one_replica():
    for mode in ("asap", "gcd"):
        constraint = toy_constraint(mode, in_workers=True)
        sampling = constraint.apply(SamplingParams(max_tokens=MAX_TOKENS))
        assert GrammarParams.model_validate_json(sampling.worker_args[WORKER_ARG]) == constraint.params
        assert sampling.affinity == (constraint.key if mode == "asap" else None)
        assert sampling.logits_processors == () and constraint.trie is None  # the worker holds the trie
    in_process = toy_constraint("asap", in_workers=False).apply(SamplingParams())
    assert in_process.worker_args == {} and len(in_process.logits_processors) == 1


def test_replaying_an_output_tells_complete_from_cut_off_and_catches_an_unconstrained_worker():
    constraint = toy_constraint("gcd", in_workers=True)
    assert constraint.details([1, 0, 1, 1, 0, STOP]).complete
    assert constraint.details([1, 0, 1, 1, 0]).complete  # a whole sentence, cut at max_tokens exactly
    assert not constraint.details([0, 0]).complete  # cut off
    assert not constraint.details([0, 0, STOP]).complete  # ended early at a dead end
    with pytest.raises(UpstreamError, match="grammar plugin"):
        constraint.details([0, 1, 0])


async def test_a_model_without_processors_or_the_plugin_is_a_400():
    request = AlignedRequest(
        engine=CategoricalEngine({"a": 1.0}),
        prompt=PromptInput(text="x"),
        sampling=SamplingParams(),
        alignment=parse_alignment({"grammar": {"syntax": "regex", "grammar": "a"}}),
    )
    pipe = Pipeline(FakeResources(), GuidelineRetriever({}), Limits())
    with pytest.raises(InvalidRequestError, match="grammar plugin") as error:
        await pipe.prepare(request)
    assert error.value.param == "alignment.grammar"
