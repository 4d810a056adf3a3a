"""Uncertainty (G-NLL) and abstention against a word LM with exact next-word tables."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from decoding.alignment import parse_alignment
from decoding.base import Limits, PromptInput
from decoding.events import ChoiceFinished, TextDelta
from decoding.pipeline import AlignedRequest, Pipeline
from models.engine import SamplingParams
from models.errors import InvalidRequestError
from tests.fakes import EOS, FakeResources, TableScorer, WordEngine, make_pipeline

# After "sure" the model is confident of its answer; after "unsure" it is not.
TABLE = {"sure": {"Paris": 0.9, "Rome": 0.1}, "unsure": {"Lyon": 0.3, "Nice": 0.3, "Metz": 0.4}}
SURE_NLL = -math.log(0.9)
UNSURE_NLL = -math.log(0.4)
ABSTAIN = {"abstain": {"threshold": 0.3, "answer": "I do not know."}}


def engine() -> WordEngine:
    return WordEngine(TABLE, default={EOS: 1.0})


def pipe() -> Pipeline:
    return make_pipeline(FakeResources(scorers=[TableScorer({" Paris": 1.0, " Rome": 0.0}, name="rm")]), Limits())


async def run(model: WordEngine, prompt: str, alignment: dict, **sampling: object):
    request = AlignedRequest(
        engine=model,
        prompt=PromptInput(text=prompt),
        sampling=SamplingParams(**{"temperature": 0.0, **sampling}),  # type: ignore[arg-type]
        alignment=parse_alignment({**alignment, "return_details": True}),
        requested_max_tokens=4,
    )
    pipeline = pipe()
    return await pipeline.run(await pipeline.prepare(request))


async def test_uncertainty_is_the_g_nll_of_the_greedy_answer_and_its_lowest_top1_probability():
    model = engine()
    result = await run(model, "the sure", {"uncertainty": {}})
    details = result.choices[0].details["uncertainty"]
    assert details.nll == pytest.approx(SURE_NLL)  # " Paris" (0.9), then the end of sequence (1.0)
    assert details.tokens == 2 and details.nll_per_token == pytest.approx(SURE_NLL / 2)
    assert details.min_top1_probability == pytest.approx(0.9)
    assert result.choices[0].text == " Paris" and result.choices[0].logprobs is None
    assert len(model.generate_calls) == 1  # a greedy plain request is its own measurement


async def test_sampled_requests_measure_with_one_greedy_call_first():
    model = engine()
    result = await run(model, "the unsure", {"uncertainty": {}}, temperature=1.0, seed=1)
    assert [params.temperature for _, params in model.generate_calls] == [0.0, 1.0]
    assert result.choices[0].details["uncertainty"].nll == pytest.approx(UNSURE_NLL)
    assert result.meter.engine_calls == 2


@pytest.mark.parametrize("measure", ["nll", "nll_per_token", "min_top1"])
async def test_abstain_answers_with_the_abstention_only_when_the_measure_passes_the_threshold(measure: str):
    alignment = {"abstain": {**ABSTAIN["abstain"], "measure": measure, "threshold": 0.5}}
    for prompt, abstains in (("the sure", False), ("the unsure", True)):
        model = engine()
        result = await run(model, prompt, alignment, n=2, temperature=1.0, seed=0)
        details = [choice.details["abstain"] for choice in result.choices]
        if measure == "nll_per_token" and prompt == "the unsure":
            abstains = UNSURE_NLL / 2 > 0.5
        assert [d.abstained for d in details] == [abstains, abstains]
        if abstains:
            assert [choice.text for choice in result.choices] == ["I do not know.", "I do not know."]
            assert len(model.generate_calls) == 1  # nothing generated after the measurement
        else:
            assert len(model.generate_calls) == 2


async def test_abstain_composes_with_best_of_n_and_decides_before_it():
    model = engine()
    result = await run(model, "the unsure", {**ABSTAIN, "best_of_n": {"n": 4, "reward": "rm"}}, temperature=1.0)
    assert result.choices[0].text == "I do not know." and "best_of_n" not in result.choices[0].details
    assert len(model.generate_calls) == 1


async def test_a_model_without_logprobs_is_refused_before_any_generation():
    model = engine()
    model._info = replace(model.info, max_logprobs=0)
    with pytest.raises(InvalidRequestError) as refused:
        await run(model, "the sure", ABSTAIN)
    assert refused.value.param == "alignment.abstain"
    assert model.generate_calls == []


def test_abstain_needs_a_threshold_within_bounds():
    for bad in ({}, {"threshold": -1}, {"threshold": 1.0, "answer": ""}):
        with pytest.raises(InvalidRequestError) as refused:
            parse_alignment({"abstain": bad})
        assert refused.value.param is not None and refused.value.param.startswith("alignment.abstain")


async def test_a_sampled_stream_streams_after_the_measurement_and_ends_with_the_same_details():
    model = engine()
    request = AlignedRequest(
        engine=model, prompt=PromptInput(text="the unsure"), sampling=SamplingParams(temperature=1.0, seed=2),
        alignment=parse_alignment({"uncertainty": {}, "return_details": True}), requested_max_tokens=4,
    )  # fmt: skip
    pipeline = pipe()
    events = [event async for event in pipeline.stream(await pipeline.prepare(request))]
    finished = [event for event in events if isinstance(event, ChoiceFinished)]
    assert [type(event) for event in events[:-1]] == [TextDelta] * (len(events) - 1)
    assert finished[0].candidate.details["uncertainty"].nll == pytest.approx(UNSURE_NLL)
    assert [params.temperature for _, params in model.generate_calls] == [0.0, 1.0]


async def fallback_run(prompt: str, *, stream: bool) -> tuple[list[str], dict, WordEngine, WordEngine, object]:
    """The request on ``engine()``, abstaining to a fallback request on another model that knows better."""
    model, expert = engine(), WordEngine({"unsure": {"Metz": 1.0}}, name="expert")
    alignment = {"abstain": {**ABSTAIN["abstain"], "fallback": "expert-profile"}, "return_details": True}
    request = AlignedRequest(engine=model, prompt=PromptInput(text=prompt), sampling=SamplingParams(temperature=0),
                             alignment=parse_alignment(alignment), requested_max_tokens=4)  # fmt: skip
    request.fallback = replace(request, engine=expert, alignment=parse_alignment({"return_details": True}))
    pipeline = pipe()
    prepared = await pipeline.prepare(request)
    if not stream:
        result = await pipeline.run(prepared)
        return [c.text for c in result.choices], result.choices[0].details, model, expert, prepared.meter
    texts, details = [""], {}
    async for event in pipeline.stream(prepared):
        if isinstance(event, TextDelta):
            texts[0] += event.text
        elif isinstance(event, ChoiceFinished):
            details = event.candidate.details
    return texts, details, model, expert, prepared.meter


@pytest.mark.parametrize("stream", [False, True])
async def test_abstain_lets_its_fallback_answer_where_the_base_is_unsure_and_only_there(stream: bool):
    texts, details, model, expert, meter = await fallback_run("the unsure", stream=stream)
    assert texts == [" Metz"] and details["abstain"].abstained and details["abstain"].fallback == "expert-profile"
    assert len(model.generate_calls) == 1 and len(expert.generate_calls) == 1  # the measurement, the fallback
    assert set(meter.by_model) == {"words", "expert"}  # type: ignore[attr-defined]
    texts, details, model, expert, _ = await fallback_run("the sure", stream=stream)
    assert texts == [" Paris"] and not details["abstain"].abstained and details["abstain"].fallback is None
    assert not expert.generate_calls
