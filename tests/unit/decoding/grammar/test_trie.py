"""ASAp's tries in log space: upper bounds, convergence to P(L) (also far below float64's resolution), the store."""

from __future__ import annotations

import math
import random

import pytest

from decoding.grammar import EFGNode, EFGStore, EFGTrie, GrammarParams, trie_key
from tests.unit.decoding.grammar.toy import GRAMMAR, LANGUAGE, P_L, STOP, Sentence, lm, probability, sample, true_c


def nodes(trie: EFGTrie):  # type: ignore[no-untyped-def]
    stack: list[tuple[EFGNode, Sentence]] = [(trie.root, ())]
    while stack:
        node, prefix = stack.pop()
        yield node, prefix
        stack.extend((child, (*prefix, token)) for token, child in node.children.items())


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


SCALE = 1e-20


def tiny_lm(prefix: Sentence) -> list[float]:
    """The toy LM with its first two grammatical steps 1e-20 as likely: P(L) ≈ 1e-40 · P_L."""
    zero, one, stop = lm(prefix)
    if len(prefix) < 2:
        return [zero * SCALE, one * SCALE, 1.0]
    return [zero, one, stop]


def test_a_language_of_mass_1e_40_keeps_an_exact_non_zero_bound():
    p_l = sum(probability(w, tiny_lm) for w in LANGUAGE)
    assert 1e-42 < p_l < 1e-39
    trie, rng = EFGTrie(), random.Random(5)
    for _ in range(400):
        assert sample(trie, rng, tiny_lm) in LANGUAGE  # never a dead end: the grammar is not lost
        assert trie.root.efg >= p_l * (1 - 1e-9)
    assert trie.root.efg == pytest.approx(p_l, rel=1e-6)
    assert math.isfinite(trie.root.log_efg)


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


def test_the_store_lists_and_forgets_tries():
    store = EFGStore()
    trie = store.trie("k1", model="m", params=GRAMMAR, max_tokens=6)
    sample(trie, random.Random(0))
    store.trie("k2", model="m", params=GRAMMAR, max_tokens=7)
    listed = store.summaries()
    assert [s.key for s in listed] == ["k2", "k1"]  # most recently used first
    first = listed[1]
    assert first.nodes == trie.size > 1 and first.root_efg == trie.root.efg and first.grammar_hash == GRAMMAR.digest
    assert store.drop("k1") and not store.drop("k1") and "k1" not in store
    assert store.clear() == 1 and len(store) == 0


def test_every_part_of_the_target_distribution_is_in_the_key():
    base = trie_key("m", [1, 2], GRAMMAR, temperature=1.0, top_p=1.0, max_tokens=8)
    other_grammar = GrammarParams(syntax="regex", grammar="a+")
    variants = [
        trie_key("n", [1, 2], GRAMMAR, temperature=1.0, top_p=1.0, max_tokens=8),
        trie_key("m", [1, 3], GRAMMAR, temperature=1.0, top_p=1.0, max_tokens=8),
        trie_key("m", [1, 2], other_grammar, temperature=1.0, top_p=1.0, max_tokens=8),
        trie_key("m", [1, 2], GRAMMAR, temperature=0.5, top_p=1.0, max_tokens=8),
        trie_key("m", [1, 2], GRAMMAR, temperature=1.0, top_p=0.9, max_tokens=8),
        trie_key("m", [1, 2], GRAMMAR, temperature=1.0, top_p=1.0, max_tokens=9),
    ]
    assert len({base, *variants}) == 7 and base == trie_key("m", [1, 2], GRAMMAR, temperature=1.0, top_p=1.0,
                                                             max_tokens=8)  # fmt: skip
