"""Nudging against word-level scripted models with exact next-word tables."""

from __future__ import annotations

import math

import pytest

from decoding.alignment import parse_alignment
from decoding.base import Limits, PromptInput
from decoding.nudging import Nudging, NudgingParams
from decoding.pipeline import AlignedRequest, Pipeline
from models.engine import SamplingParams
from models.errors import InvalidRequestError
from tests.fakes import EOS, FakeResources, TableScorer, WordEngine, make_pipeline

BASE = {
    "A:": {"The": 0.5, "Well": 0.5},
    "Assistant:": {"The": 0.5, "Well": 0.5},
    "Sure": {"the": 0.9, "a": 0.1},
    "The": {"answer": 0.9, "result": 0.1},
    "the": {"answer": 0.9, "result": 0.1},
    "thing": {"the": 0.6, "a": 0.4},
    "answer": {"is": 0.95, "was": 0.05},
    "is": {"five": 0.4, "four": 0.3, "4": 0.3},
    "five": {EOS: 0.9, "!": 0.1},
    "four": {EOS: 0.9, "!": 0.1},
    "4": {".": 0.9, "!": 0.1},
    ".": {EOS: 0.55, "Happy": 0.45},
    "Happy": {"to": 0.5, "birthday": 0.5},
    "to": {"help.": 0.7, "go.": 0.3},
    "help.": {EOS: 1.0},
}
NUDGER = {
    "[assistant]": {"Sure": 0.8, "The": 0.2},
    "Sure": {"thing": 0.6, "the": 0.4},
    "thing": {"the": 0.9, "a": 0.1},
    "the": {"answer": 0.8, "result": 0.2},
    "answer": {"is": 1.0},
    "is": {"4": 0.9, "four": 0.1},
    "4": {".": 0.9, EOS: 0.1},
    ".": {"Happy": 0.6, EOS: 0.4},
    "Happy": {"to": 1.0},
    "to": {"help.": 1.0},
    "help.": {EOS: 1.0},
}
BASE_PROMPT = "Q: what is 2+2? A:"
NUDGER_PROMPT = "[user] what is 2+2?\n[assistant]\n"


def params(gamma: float, **overrides: object) -> NudgingParams:
    # model_construct skips the 0..1 bound on gamma, so the limits can be tested.
    return NudgingParams.model_construct(nudger="nudger", gamma=gamma, **overrides)


async def nudge(gamma: float, base: WordEngine | None = None, nudger: WordEngine | None = None, **options: object):
    base = base or WordEngine(BASE, name="base", chat_template=False)
    nudger = nudger or WordEngine(NUDGER, name="nudger")
    run = Nudging(
        base,
        nudger,
        base_prompt_ids=base.tokenizer.encode(str(options.pop("base_prompt", BASE_PROMPT))),
        nudger_prompt_ids=nudger.tokenizer.encode(str(options.pop("nudger_prompt", NUDGER_PROMPT))),
        params=params(gamma, **options),
        max_tokens=40,
    )
    return await run.run()


async def greedy(engine: WordEngine, prompt: str) -> str:
    completion = await engine.generate(prompt, SamplingParams(max_tokens=40, temperature=0))
    return completion.samples[0].text


async def test_gamma_above_one_gives_the_nudgers_greedy_answer():
    text, finish, details = await nudge(1.5)
    assert text == (await greedy(WordEngine(NUDGER), NUDGER_PROMPT)).lstrip()
    assert finish == "stop" and details.nudged_token_fraction == 1.0
    assert {span.source for span in details.spans} == {"nudger"}


async def test_gamma_zero_gives_the_nudgers_first_word_then_the_base():
    text, _, details = await nudge(0.0)
    first = (await greedy(WordEngine(NUDGER), NUDGER_PROMPT)).split()[0]
    assert text == first + await greedy(WordEngine(BASE), f"{BASE_PROMPT} {first}")
    assert [span.source for span in details.spans] == ["nudger", "base"] and details.rounds == 0


@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.45, 0.6, 0.95, 1.5])
async def test_the_same_model_as_base_and_nudger_gives_its_greedy_output(gamma: float):
    model = WordEngine(BASE)
    prompt = "Q: what is 2+2? A:"
    text, _, _ = await nudge(gamma, base=model, nudger=model, base_prompt=prompt, nudger_prompt=prompt + "\n")
    assert text == (await greedy(model, prompt)).lstrip()


@pytest.mark.parametrize("gamma", [0.35, 0.45, 0.6, 0.92])
async def test_every_later_nudge_starts_where_the_base_was_unsure(gamma: float):
    text, _, details = await nudge(gamma)
    nudges = [span for span in details.spans if span.source == "nudger"]
    assert details.spans[0].source == "nudger" and details.spans[0].base_p1 is None
    assert all(span.base_p1 is not None and span.base_p1 < gamma for span in nudges[1:])
    assert "".join(span.text for span in details.spans) == text
    assert len(nudges) - 1 == details.rounds
    nudged = sum(len(span.text.split()) for span in nudges)
    assert details.nudged_token_fraction == pytest.approx(nudged / len(text.split()))


async def test_strict_inequality_at_gamma_equal_to_p1():
    # After "is" the base's p1 is exactly 0.4: gamma = 0.4 is not "unsure", gamma = 0.41 is.
    at, _, at_details = await nudge(0.4)
    above, _, above_details = await nudge(0.41)
    assert all(span.base_p1 != 0.4 for span in at_details.spans if span.base_p1 is not None)
    assert any(span.base_p1 == pytest.approx(0.4) for span in above_details.spans)
    assert "five" in at and "4" in above


async def test_the_probe_is_one_base_call_per_nudge():
    base = WordEngine(BASE, name="base", chat_template=False)
    _, _, details = await nudge(0.92, base=base)
    probes = [params for _, params in base.generate_calls if params.prompt_logprobs is not None]
    assert len(probes) <= details.rounds


async def test_repetition_guard_stops_a_loop():
    looping = WordEngine({"[assistant]": {"la": 1.0}, "la": {"la": 1.0}}, name="nudger")
    unsure = WordEngine({}, default={"x": 0.5, "y": 0.5}, name="base", chat_template=False)
    text, finish, details = await nudge(0.9, base=unsure, nudger=looping, nudge_max_tokens=1)
    assert details.stopped_by == "repetition" and finish == "stop"
    assert text.split().count("la") >= 3


async def test_max_rounds_bounds_the_nudges():
    unsure = WordEngine({}, default={"x": 0.5, "y": 0.5}, name="base", chat_template=False)
    chatty = WordEngine({}, default={"a": 0.5, "b": 0.5}, name="nudger")
    _, finish, details = await nudge(0.9, base=unsure, nudger=chatty, max_rounds=3, nudge_max_tokens=1)
    assert details.rounds == 3 and details.stopped_by in ("max_rounds", "repetition", "length")
    assert finish in ("length", "stop")


def pipeline(scorers: list[TableScorer] | None = None) -> tuple[Pipeline, WordEngine]:
    base = WordEngine(BASE, name="base", chat_template=False)
    resources = FakeResources(
        engines={
            "nudger": WordEngine(NUDGER, name="nudger"),
            "plain": WordEngine({}, name="plain", chat_template=False),
        },
        scorers=scorers or [],
    )
    return make_pipeline(resources, Limits(max_nudging_rounds=20)), base


async def run(pipe: Pipeline, base: WordEngine, alignment: dict, *, n: int = 1):
    request = AlignedRequest(
        engine=base,
        prompt=PromptInput(messages=[{"role": "user", "content": "what is 2+2?"}]),
        sampling=SamplingParams(n=n),
        alignment=parse_alignment({**alignment, "return_details": True}),
        requested_max_tokens=30,
    )
    return await pipe.run(await pipe.prepare(request))


async def test_nudging_as_a_pipeline_strategy_with_usage_of_both_models():
    pipe, base = pipeline()
    result = await run(pipe, base, {"nudging": {"nudger": "nudger", "gamma": 0.45}})
    choice = result.choices[0]
    assert choice.text.startswith("Sure") and choice.details["nudging"].rounds >= 1
    assert set(result.meter.by_model) == {"base", "nudger"}
    assert result.meter.by_model["nudger"].completion_tokens > 0 and result.meter.by_model["base"].prompt_tokens > 0


async def test_nudging_composes_with_best_of_n():
    scorer = TableScorer({}, name="rm")
    scorer.rewards = _LengthRewards()  # type: ignore[assignment]
    pipe, base = pipeline([scorer])
    result = await run(pipe, base, {"nudging": {"nudger": "nudger"}, "best_of_n": {"n": 3, "reward": "rm"}})
    assert len(result.choices[0].details["best_of_n"].candidates) == 3 and scorer.batches == [3]


class _LengthRewards(dict):
    def __getitem__(self, response: str) -> float:
        return float(len(response))


@pytest.mark.parametrize(
    ("alignment", "param"),
    [
        ({"nudging": {"nudger": "missing"}}, "alignment.nudging.nudger"),
        ({"nudging": {"nudger": "plain"}}, "alignment.nudging.nudger"),
        ({"nudging": {"nudger": "nudger", "gamma": 1.5}}, "alignment.nudging.gamma"),
        ({"nudging": {"nudger": "nudger", "max_rounds": 50}}, "alignment.nudging.max_rounds"),
    ],
)
async def test_bad_nudging_requests(alignment: dict, param: str):
    pipe, base = pipeline()
    with pytest.raises(InvalidRequestError) as info:
        await run(pipe, base, alignment)
    assert info.value.param == param


def test_p1_is_a_probability():
    assert math.isclose(sum(BASE["is"].values()), 1.0)
