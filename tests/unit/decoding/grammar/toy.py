"""The exact toy of METHODS.md §4, with real xgrammar masks.

Vocabulary {0, 1, $} ($ ends a sentence); the language is {00000} or 1{0,1}^4, each followed
by $; the LM is a table of next-token probabilities, so Q(w) ∝ P(w)·1[w ∈ L] is enumerable.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable

import torch
import xgrammar

from decoding.grammar import EFGTrie, GrammarCompiler, GrammarParams, grammar_processors
from models.engine import LogitsProcessor

STOP = 2
GRAMMAR = GrammarParams(syntax="ebnf", grammar='root ::= "00000" | "1" [01] [01] [01] [01]')
MAX_TOKENS = 6
Sentence = tuple[int, ...]
LM = Callable[[Sentence], list[float]]


def lm(prefix: Sentence) -> list[float]:
    """P(next | prefix) over (0, 1, $)."""
    if not prefix:
        return [0.7, 0.3, 0.0]
    if len(prefix) < 5:
        return [0.45, 0.45, 0.1] if prefix[0] == 0 else [0.3, 0.6, 0.1]
    return [0.1, 0.1, 0.8]


def toy_info() -> xgrammar.TokenizerInfo:
    return xgrammar.TokenizerInfo(["0", "1", "</s>"], stop_token_ids=[STOP])


def toy_compiler(**options: int) -> GrammarCompiler:
    return GrammarCompiler(toy_info(), vocab_size=3, stop_ids=[STOP], **options)


COMPILED = toy_compiler().compile(GRAMMAR)
LANGUAGE = [(0, 0, 0, 0, 0, STOP)] + [(1, *tail, STOP) for tail in itertools.product((0, 1), repeat=4)]


def probability(sentence: Sentence, model: LM = lm) -> float:
    return math.prod(model(sentence[:i])[token] for i, token in enumerate(sentence))


P_L = sum(probability(w) for w in LANGUAGE)
Q = {w: probability(w) / P_L for w in LANGUAGE}


def true_c(prefix: Sentence) -> float:
    """Expected future grammaticality: P(a completion of prefix is in L | prefix)."""
    return sum(probability(w) for w in LANGUAGE if w[: len(prefix)] == prefix) / probability(prefix)


def processor(trie: EFGTrie | None) -> LogitsProcessor:
    return grammar_processors(COMPILED, vocab_size=3, max_tokens=MAX_TOKENS, trie=trie)


def logits_of(prefix: Sentence, model: LM = lm) -> torch.Tensor:
    return torch.log(torch.tensor(model(prefix), dtype=torch.float64).clamp_min(1e-300))


def step_distribution(proc: LogitsProcessor, prefix: Sentence, model: LM = lm) -> torch.Tensor:
    return torch.softmax(proc(list(prefix), logits_of(prefix, model)), dim=-1)


def sample(trie: EFGTrie | None, rng: random.Random, model: LM = lm) -> Sentence:
    proc, prefix = processor(trie), ()
    while len(prefix) < MAX_TOKENS:
        token = rng.choices(range(3), weights=step_distribution(proc, prefix, model).tolist())[0]
        prefix = (*prefix, token)
        if token == STOP:
            break
    return prefix


def exact_distribution(make_trie: Callable[[], EFGTrie | None]) -> dict[Sentence, float]:
    """The sampler's distribution over sentences, by enumerating every path (a fresh processor each)."""
    result: dict[Sentence, float] = {}

    def walk(prefix: Sentence, mass: float) -> None:
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
