"""Best-of-N and relatives against a categorical toy LM with exact distributions."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
from scipy.stats import chisquare

from decoding.alignment import parse_alignment
from decoding.base import Limits, PromptInput
from decoding.best_of_n import BestOfNParams, canonical_answer, selection_order, soft_probabilities
from decoding.pipeline import AlignedRequest, Pipeline
from models.engine import SamplingParams
from models.errors import InvalidRequestError
from tests.fakes import CategoricalEngine, FakeResources, TableScorer, make_pipeline

# Answers in increasing reward order, with their probabilities under the toy LM.
P = {"a": 0.4, "b": 0.3, "c": 0.2, "d": 0.1}
REWARD = {"a": 0.0, "b": 1.0, "c": 2.0, "d": 3.0}


def bon_distribution(p: dict[str, float], reward: dict[str, float], n: int, *, worst: bool = False) -> dict[str, float]:
    """Exact best-of-N (worst-of-N): P(y_i) = F(y_i)^N - F(y_{i-1})^N in reward order."""
    order = sorted(p, key=lambda y: reward[y], reverse=worst)
    result, cdf = {}, 0.0
    for y in order:
        previous, cdf = cdf, cdf + p[y]
        result[y] = cdf**n - previous**n
    return result


def kl(q: dict[str, float], p: dict[str, float]) -> float:
    return sum(qy * math.log(qy / p[y]) for y, qy in q.items() if qy > 0)


def pipeline(
    scorers: list[TableScorer] | None = None, answers: dict[str, float] = P
) -> tuple[Pipeline, CategoricalEngine]:
    engine = CategoricalEngine(answers)
    resources = FakeResources(scorers=scorers or [TableScorer(REWARD)])
    return make_pipeline(resources, Limits(max_best_of_n=64)), engine


async def run(pipe: Pipeline, engine: CategoricalEngine, alignment: dict, *, n: int = 1, seed: int | None = None):
    request = AlignedRequest(
        engine=engine,
        prompt=PromptInput(text="Q: pick a letter\nA:"),
        sampling=SamplingParams(n=n, seed=seed),
        alignment=parse_alignment({**alignment, "return_details": True}),
        requested_max_tokens=4,
    )
    return await pipe.run(await pipe.prepare(request))


async def test_returned_sample_is_the_argmax_and_argmin_of_the_reward():
    pipe, engine = pipeline()
    for select, pick in (("max", max), ("min", min)):
        for seed in range(20):
            result = await run(pipe, engine, {"best_of_n": {"n": 5, "reward": "rm", "select": select}}, seed=seed)
            details = result.choices[0].details["best_of_n"]
            rewards = [candidate.reward for candidate in details.candidates]
            assert REWARD[result.choices[0].text] == pick(rewards)
            assert details.chosen == rewards.index(pick(rewards))  # ties: the lowest index


async def test_one_engine_call_with_n_and_one_batched_scoring_call():
    scorer = TableScorer(REWARD)
    pipe, engine = pipeline([scorer])
    result = await run(pipe, engine, {"best_of_n": {"n": 8, "reward": "rm"}})
    assert [params.n for params in engine.calls] == [8]
    assert scorer.batches == [8]
    assert (result.meter.engine_calls, result.meter.reward_calls) == (1, 1)
    assert result.meter.completion_tokens == 8  # every candidate is paid for


async def test_n_equal_one_is_plain_sampling():
    pipe, engine = pipeline()
    for seed in range(10):
        plain = await run(pipe, engine, {}, seed=seed)
        best = await run(pipe, engine, {"best_of_n": {"n": 1, "reward": "rm"}}, seed=seed)
        assert best.choices[0].text == plain.choices[0].text


@pytest.mark.parametrize(("n", "select"), [(2, "max"), (4, "max"), (3, "min")])
async def test_selection_frequencies_match_the_closed_form(n: int, select: str):
    pipe, engine = pipeline()
    trials = 3000
    counts = Counter()
    for seed in range(trials):
        result = await run(pipe, engine, {"best_of_n": {"n": n, "reward": "rm", "select": select}}, seed=seed)
        counts[result.choices[0].text] += 1
    expected = bon_distribution(P, REWARD, n, worst=select == "min")
    observed = [counts[y] for y in P]
    assert chisquare(observed, [expected[y] * trials for y in P]).pvalue > 1e-3


@pytest.mark.parametrize("n", [1, 2, 4, 8, 32])
def test_kl_and_win_rate_bounds(n: int):
    rng = random.Random(n)
    for _ in range(50):
        weights = [rng.random() + 1e-3 for _ in range(6)]
        p = {str(i): w / sum(weights) for i, w in enumerate(weights)}
        reward = {y: rng.random() for y in p}
        q = bon_distribution(p, reward, n)
        assert sum(q.values()) == pytest.approx(1)
        assert kl(q, p) <= math.log(n) - (n - 1) / n + 1e-9
        win = sum(q[y] * p[z] * (1.0 if reward[y] > reward[z] else 0.5 if y == z else 0.0) for y in p for z in p)
        assert win <= n / (n + 1) + 1e-9


def test_soft_limits():
    rewards = [0.3, 2.0, 1.0, 2.0]
    assert soft_probabilities(rewards, 1e-6) == pytest.approx([0, 0.5, 0, 0.5], abs=1e-9)
    assert soft_probabilities(rewards, 1e9) == pytest.approx([0.25] * 4)
    params = BestOfNParams.model_validate({"reward": "rm", "select": "soft", "lambda": 1e-6})
    assert selection_order(rewards, ["w", "x", "y", "z"], params, random.Random(0))[0] in (1, 3)


@pytest.mark.parametrize(("lam", "n"), [(1e-4, 3), (1e4, 3)])
async def test_soft_best_of_n_between_best_of_n_and_plain_sampling(lam: float, n: int):
    pipe, engine = pipeline()
    trials = 3000
    counts = Counter()
    for seed in range(trials):
        align = {"best_of_n": {"n": n, "reward": "rm", "select": "soft", "lambda": lam}}
        counts[(await run(pipe, engine, align, seed=seed)).choices[0].text] += 1
    expected = bon_distribution(P, REWARD, n) if lam < 1 else P
    assert chisquare([counts[y] for y in P], [expected[y] * trials for y in P]).pvalue > 1e-3


async def test_ties_take_the_lowest_index():
    pipe, engine = pipeline([TableScorer(dict.fromkeys(P, 1.0))])
    result = await run(pipe, engine, {"best_of_n": {"n": 6, "reward": "rm"}}, seed=3)
    assert result.choices[0].details["best_of_n"].chosen == 0


async def test_majority_vote_over_canonical_answers():
    answers = {"The answer is 4.": 0.5, "the answer is 4": 0.3, "It is 5": 0.2}
    rewards = {"The answer is 4.": 0.0, "the answer is 4": 0.1, "It is 5": 5.0}
    pipe, engine = pipeline([TableScorer(rewards)], answers)
    counted = await run(pipe, engine, {"best_of_n": {"n": 9, "reward": "rm", "select": "vote"}}, seed=1)
    assert canonical_answer(counted.choices[0].text, "text") == "the answer is 4"
    weighted = await run(
        pipe, engine, {"best_of_n": {"n": 9, "reward": "rm", "select": "vote", "vote_weighting": "reward"}}, seed=1
    )
    assert weighted.choices[0].text == "It is 5"
    assert canonical_answer("so 1,250 apples, then 12.5", "last_number") == "12.5"


async def test_reward_ensembles():
    first = TableScorer({"a": 0.0, "b": 4.0, "c": 1.0, "d": 2.0}, name="r1")
    second = TableScorer({"a": 0.0, "b": -4.0, "c": 1.0, "d": 1.0}, name="r2")
    pipe, engine = pipeline([first, second], {"a": 0.25, "b": 0.25, "c": 0.25, "d": 0.25})

    async def winner(aggregate: str, k: float = 1.0) -> str:
        align = {"best_of_n": {"n": 16, "reward": ["r1", "r2"], "aggregate": aggregate, "k": k}}
        result = await run(pipe, engine, align, seed=0)
        assert first.batches[-1] == second.batches[-1] == 16
        return result.choices[0].text

    assert await winner("mean") == "d"  # means: a 0, b 0, c 1, d 1.5
    assert await winner("min") in ("c", "d")  # mins: a 0, b -4, c 1, d 1
    assert await winner("mean_minus_std", k=2.0) == "c"  # d: 1.5 - 2*0.5 = 0.5 < c: 1


async def test_client_n_returns_the_top_n_of_n_in_order():
    pipe, engine = pipeline()
    result = await run(pipe, engine, {"best_of_n": {"n": 8, "reward": "rm"}}, n=3, seed=2)
    rewards = [REWARD[choice.text] for choice in result.choices]
    assert rewards == sorted(rewards, reverse=True) and len(rewards) == 3
    assert [choice.details["best_of_n"].rank for choice in result.choices] == [0, 1, 2]


@pytest.mark.parametrize(
    ("alignment", "n", "param"),
    [
        ({"best_of_n": {"n": 4, "reward": "nope"}}, 1, "alignment.best_of_n.reward"),
        ({"best_of_n": {"n": 100, "reward": "rm"}}, 1, "alignment.best_of_n.n"),
        ({"best_of_n": {"n": 2, "reward": "rm"}}, 3, "n"),
        ({"best_of_n": {"n": 2, "reward": "rm", "select": "best"}}, 1, "alignment.best_of_n.select"),
        ({"best_of_n": {"n": 2}}, 1, "alignment.best_of_n.reward"),
        ({"best_of_n": {"n": 2, "reward": "rm", "temperature": 3}}, 1, "alignment.best_of_n.temperature"),
        ({"best_of_m": {"n": 2}}, 1, "alignment.best_of_m"),
    ],
)
async def test_bad_parameters_are_400s_naming_the_field(alignment: dict, n: int, param: str):
    pipe, engine = pipeline()
    with pytest.raises(InvalidRequestError) as info:
        await run(pipe, engine, alignment, n=n)
    assert info.value.param == param
