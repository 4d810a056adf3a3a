"""The pipeline folds over the methods' stage hooks; a stream is the incremental view of ``run``'s result."""

from __future__ import annotations

import pytest

from decoding.alignment import parse_alignment
from decoding.base import Limits, MethodParams, PromptInput
from decoding.events import ChoiceFinished, StreamEvent, TextDelta
from decoding.guidelines import GuidelineRetriever
from decoding.pipeline import AlignedRequest, Pipeline, PipelineResult
from decoding.stages import MethodSpec, Services
from models.engine import SamplingParams
from models.errors import InvalidRequestError, WorkBudgetExceededError
from tests.fakes import CategoricalEngine, FakeResources, TableScorer, WordEngine, make_pipeline

ANSWERS = {"yes": 0.5, "no": 0.3, "maybe": 0.2}


def request(alignment: dict, *, n: int = 1, seed: int = 3, max_tokens: int = 8) -> AlignedRequest:
    return AlignedRequest(
        engine=CategoricalEngine(ANSWERS),
        prompt=PromptInput(text="Q: well?\nA:"),
        sampling=SamplingParams(n=n, seed=seed),
        alignment=parse_alignment({**alignment, "return_details": True}),
        requested_max_tokens=max_tokens,
    )


def pipeline() -> Pipeline:
    return make_pipeline(FakeResources(scorers=[TableScorer({"yes": 1.0, "no": 2.0, "maybe": 0.0})]))


async def run_and_stream(alignment: dict, **options: int) -> tuple[PipelineResult, list[StreamEvent]]:
    pipe = pipeline()
    result = await pipe.run(await pipe.prepare(request(alignment, **options)))
    events = [event async for event in pipe.stream(await pipe.prepare(request(alignment, **options)))]
    return result, events


@pytest.mark.parametrize("alignment", [{}, {"best_of_n": {"n": 3, "reward": "rm"}}])
async def test_a_stream_ends_each_choice_with_the_candidate_run_returns(alignment: dict):
    result, events = await run_and_stream(alignment, n=2)
    finished = {event.index: event.candidate for event in events if isinstance(event, ChoiceFinished)}
    texts = {
        index: "".join(e.text for e in events if isinstance(e, TextDelta) and e.index == index) for index in finished
    }
    assert [finished[i] for i in range(2)] == result.choices
    assert [texts[i] for i in range(2)] == [choice.text for choice in result.choices]


async def test_selection_draws_its_candidates_and_returns_n():
    result, _ = await run_and_stream({"best_of_n": {"n": 4, "reward": "rm"}}, n=2)
    assert len(result.choices) == 2 and result.meter.completion_tokens == sum(
        len(c.text)
        for c in result.choices[0].details["best_of_n"].candidates  # type: ignore[attr-defined]
    )


async def test_a_processor_stage_method_only_runs_inside_the_plain_strategy():
    resources = FakeResources(engines={"nudger": WordEngine({}, name="nudger")})
    alignment = {"grammar": {"syntax": "regex", "grammar": "a"}, "nudging": {"nudger": "nudger"}}
    with pytest.raises(InvalidRequestError) as info:
        await make_pipeline(resources).prepare(request(alignment))
    assert info.value.param == "alignment.grammar" and "nudging" in info.value.message


async def test_the_work_budget_is_checked_before_any_generation():
    pipe = make_pipeline(FakeResources(scorers=[TableScorer({})]), Limits(max_request_work=10))
    engine = CategoricalEngine(ANSWERS)
    aligned = request({"best_of_n": {"n": 4, "reward": "rm"}})
    aligned.engine = engine
    with pytest.raises(WorkBudgetExceededError) as info:
        await pipe.prepare(aligned)
    assert info.value.param == "max_tokens" and engine.calls == []


def test_a_method_registers_exactly_one_stage_hook():
    with pytest.raises(ValueError, match="exactly one"):
        MethodSpec(MethodParams)


def test_a_missing_service_is_named():
    with pytest.raises(LookupError, match="GuidelineRetriever"):
        Services().get(GuidelineRetriever)
