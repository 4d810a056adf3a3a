"""Calibrated rewards (InfAlign): quantiles among reference samples of the base, exact against table scorers."""

from __future__ import annotations

import math
import random

import pytest

from decoding.alignment import parse_alignment
from decoding.base import Limits, PromptInput
from decoding.best_of_n import REFERENCE_SEED_OFFSET, CalibrationParams, calibrated, transformed
from decoding.pipeline import AlignedRequest
from models.engine import SamplingParams
from models.errors import InvalidRequestError, WorkBudgetExceededError
from tests.fakes import CategoricalEngine, FakeResources, TableScorer, make_pipeline
from tests.unit.decoding.test_best_of_n import REWARD, pipeline, run

SEEDS = range(60)
CALIBRATE = {"references": 6}


def test_a_reward_becomes_its_quantile_among_the_references_ties_counting_half():
    assert calibrated([1.0, -1.0, 5.0, 0.5], [0.0, 1.0, 1.0, 2.0]) == [0.5, 0.0, 1.0, 0.25]


def test_the_transforms_are_infaligns():
    assert transformed([0.0, 1.0], CalibrationParams(transform="best_of_n", t=2.0)) == [1.0, math.exp(2.0)]
    assert transformed([0.0, 1.0], CalibrationParams(transform="worst_of_n", t=2.0)) == [-1.0, -math.exp(-2.0)]
    assert transformed([0.25], CalibrationParams()) == [0.25]


@pytest.mark.parametrize("select", ["max", "min"])
async def test_max_and_min_selection_are_unchanged_by_calibration(select: str):
    pipe, engine = pipeline()
    for seed in SEEDS:
        raw = await run(pipe, engine, {"best_of_n": {"n": 8, "reward": "rm", "select": select}}, seed=seed)
        cal = await run(
            pipe, engine, {"best_of_n": {"n": 8, "reward": "rm", "select": select, "calibrate": CALIBRATE}}, seed=seed
        )
        assert cal.choices[0].text == raw.choices[0].text
        assert cal.choices[0].details["best_of_n"].chosen == raw.choices[0].details["best_of_n"].chosen


async def test_an_ensemble_of_a_reward_and_its_copy_times_1000_is_one_scorer_when_calibrated_and_not_when_raw():
    scaled = TableScorer({answer: 1000 * reward for answer, reward in REWARD.items()}, name="rm1000")
    pipe, engine = pipeline([TableScorer(REWARD), scaled])
    soft = {"n": 8, "select": "soft", "lambda": 0.5}
    differs = 0
    for seed in SEEDS:
        single = await run(pipe, engine, {"best_of_n": {**soft, "reward": "rm", "calibrate": CALIBRATE}}, seed=seed)
        both = await run(
            pipe, engine, {"best_of_n": {**soft, "reward": ["rm", "rm1000"], "calibrate": CALIBRATE}}, seed=seed
        )
        assert both.choices[0].details["best_of_n"].chosen == single.choices[0].details["best_of_n"].chosen
        scores = both.choices[0].details["best_of_n"].candidates
        assert all(score.calibrated["rm"] == score.calibrated["rm1000"] for score in scores)  # type: ignore[index]
        raw_single = await run(pipe, engine, {"best_of_n": {**soft, "reward": "rm"}}, seed=seed)
        raw_both = await run(pipe, engine, {"best_of_n": {**soft, "reward": ["rm", "rm1000"]}}, seed=seed)
        differs += raw_both.choices[0].text != raw_single.choices[0].text
    assert differs >= 10  # raw, the copy's scale makes soft selection a hard max


async def test_the_references_are_one_more_engine_call_counted_in_usage_and_in_the_details():
    pipe, engine = pipeline()
    result = await run(pipe, engine, {"best_of_n": {"n": 4, "reward": "rm", "calibrate": CALIBRATE}}, seed=3)
    assert [call.n for call in engine.calls] == [4, 6]
    assert engine.calls[1].seed != engine.calls[0].seed
    assert result.meter.engine_calls == 2
    details = result.choices[0].details["best_of_n"]
    assert len(details.reference_rewards["rm"]) == 6  # type: ignore[index]
    tokens = sum(len(c.text) for c in details.candidates)
    assert result.meter.completion_tokens == tokens + sum(len(t) for t in _reference_texts(engine, 3))


def _reference_texts(engine: CategoricalEngine, seed: int) -> list[str]:
    rng = random.Random(seed + REFERENCE_SEED_OFFSET)
    return rng.choices(engine.answers, weights=engine.weights, k=6)


async def test_greedy_references_and_budgets_are_refused_before_any_generation():
    pipe, engine = pipeline()

    def request(sampling: SamplingParams, references: int = 6) -> AlignedRequest:
        alignment = {"best_of_n": {"n": 4, "reward": "rm", "calibrate": {"references": references}}}
        return AlignedRequest(engine, PromptInput(text="Q"), sampling, parse_alignment(alignment), 4)

    with pytest.raises(InvalidRequestError) as greedy:
        await pipe.prepare(request(SamplingParams(temperature=0)))
    assert greedy.value.param == "alignment.best_of_n.calibrate"
    tight = make_pipeline(FakeResources(scorers=[TableScorer(REWARD)]), Limits(max_request_work=4 * 4 * 2 + 1))
    with pytest.raises(WorkBudgetExceededError, match="10 samples"):
        await tight.prepare(request(SamplingParams()))
    assert engine.calls == []
