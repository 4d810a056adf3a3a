"""GCD and ASAp processors on the exact toy: the distributions they sample, and how they compose."""

from __future__ import annotations

import random
import threading
from collections import Counter

import pytest
import torch
from scipy.stats import chisquare

from decoding.grammar import ASApLogitsProcessor, EFGTrie, GCDLogitsProcessor, GrammarState, grammar_processors
from models.engine import LogitsProcessorList
from tests.unit.decoding.grammar.toy import (
    COMPILED,
    LANGUAGE,
    MAX_TOKENS,
    P_L,
    STOP,
    Q,
    Sentence,
    exact_distribution,
    lm,
    logits_of,
    processor,
    sample,
    step_distribution,
    true_c,
)


def gcd_distribution() -> dict[Sentence, float]:
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

    def grow(node, prefix: Sentence) -> None:  # type: ignore[no-untyped-def]
        node.efg = true_c(prefix) if prefix else P_L
        if len(prefix) == MAX_TOKENS or (prefix and prefix[-1] == STOP):
            return
        for token, p in enumerate(lm(prefix)):
            path = (*prefix, token)
            if p > 0 and any(w[: len(path)] == path for w in LANGUAGE):
                grow(trie.child(node, token, float(torch.log(torch.tensor(p, dtype=torch.float64)))), path)

    grow(trie.root, ())
    return trie


def test_with_the_true_c_the_sampler_is_q():
    trie = oracle_trie()
    sampler = exact_distribution(lambda: trie)
    assert [sampler.get(w, 0.0) for w in LANGUAGE] == pytest.approx([Q[w] for w in LANGUAGE], abs=1e-9)


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


def test_sequences_decoded_as_one_batch_share_the_trie_and_still_match_q():
    """Like an engine with ``n = 8``: eight sequences step in lockstep over one trie; finished ones stop."""
    trie, rng, counts = EFGTrie(), random.Random(4), Counter()
    for _ in range(600):
        batch = [(processor(trie), ()) for _ in range(8)]
        while any(len(p) < MAX_TOKENS and (not p or p[-1] != STOP) for _, p in batch):
            for row, (proc, prefix) in enumerate(batch):
                if prefix and (prefix[-1] == STOP or len(prefix) == MAX_TOKENS):
                    continue  # a finished row: its processors are not called again
                token = rng.choices(range(3), weights=step_distribution(proc, prefix).tolist())[0]
                batch[row] = (proc, (*prefix, token))
        counts.update(prefix for _, prefix in batch)
    trials = sum(counts.values())
    assert set(counts) <= set(LANGUAGE)
    assert chi_square_p(counts, trials) > 1e-3
    assert trie.root.efg == pytest.approx(P_L, rel=1e-9)


def test_every_sample_is_in_the_language():
    rng = random.Random(2)
    for trie in (None, EFGTrie()):
        assert all(sample(trie, rng) in LANGUAGE for _ in range(200))


def test_processors_return_new_tensors_and_leave_their_input_alone():
    for make in (lambda: processor(None), lambda: processor(EFGTrie())):
        proc = make()
        for prefix in [(), (1,), (1, 0), (1, 0, 1)]:
            logits = logits_of(prefix)
            before = logits.clone()
            result = proc(list(prefix), logits)
            assert torch.equal(logits, before) and result is not logits


def test_a_list_is_its_processors_applied_in_order():
    trie = EFGTrie()
    for _ in range(50):
        sample(trie, random.Random(7))
    listed_state = GrammarState(COMPILED, vocab_size=3, max_tokens=MAX_TOKENS)
    listed = LogitsProcessorList(
        [ASApLogitsProcessor(listed_state, trie, threading.RLock()), GCDLogitsProcessor(listed_state)]
    )
    state = GrammarState(COMPILED, vocab_size=3, max_tokens=MAX_TOKENS)
    asap, gcd = ASApLogitsProcessor(state, trie, threading.RLock()), GCDLogitsProcessor(state)
    for prefix in [(), (1,), (1, 1), (1, 1, 0)]:
        logits = logits_of(prefix)
        assert torch.equal(listed(list(prefix), logits), gcd(list(prefix), asap(list(prefix), logits)))


def test_the_last_position_of_the_budget_allows_only_an_ending():
    proc = grammar_processors(COMPILED, vocab_size=3, max_tokens=3)
    step_distribution(proc, ())
    step_distribution(proc, (1,))
    last = step_distribution(proc, (1, 0))
    assert last.tolist() == [0.0, 0.0, 1.0]  # "10" cannot end: a dead end, the sequence is ended


def test_a_call_after_the_end_changes_nothing():
    trie = EFGTrie()
    proc = processor(trie)
    sentence = LANGUAGE[3]
    for i in range(len(sentence)):
        step_distribution(proc, sentence[:i])
    nodes, root = trie.size, trie.root.efg
    after = proc(list(sentence), logits_of(sentence))
    assert trie.size == nodes and trie.root.efg == root
    assert int(after.argmax()) == STOP
