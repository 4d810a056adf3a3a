"""GenARM on a tabular toy: a bigram base and a bigram autoregressive reward model sharing its words."""

from __future__ import annotations

import itertools
import math
from collections import Counter
from dataclasses import replace

import pytest
from scipy.stats import chisquare

from decoding.alignment import parse_alignment
from decoding.base import Limits, PromptInput
from decoding.genarm import GenArm, GenArmDetails, GenArmParams
from decoding.pipeline import AlignedRequest, Pipeline
from models.engine import SamplingParams
from models.errors import InvalidRequestError
from tests.fakes import EOS, FakeResources, WordEngine, make_pipeline

BASE = {
    "go": {"a": 0.5, "b": 0.3, "c": 0.2},
    "a": {"a": 0.6, "b": 0.4},
    "b": {"c": 0.7, EOS: 0.3},
    "c": {"a": 0.5, EOS: 0.5},
}
ARM = {
    "go": {"a": 0.1, "b": 0.2, "c": 0.7},
    "a": {"a": 0.2, "b": 0.8},
    "b": {"c": 0.4, EOS: 0.6},
    "c": {"a": 0.1, EOS: 0.9},
}
PROMPT = "go"


def engines() -> tuple[WordEngine, WordEngine]:
    shared: dict[str, int] = {}
    return (WordEngine(BASE, name="base", chat_template=False, vocabulary=shared),
            WordEngine(ARM, name="arm", chat_template=False, vocabulary=shared))  # fmt: skip


async def decode(
    *, max_tokens: int = 3, seed: int | None = 0, stop: tuple[str, ...] = (), **overrides: object
) -> tuple[list[int], str, str, GenArmDetails, WordEngine, WordEngine]:
    base, arm = engines()
    params = GenArmParams.model_validate({"reward_model": "arm", "top_k": 3, **overrides})
    prompt_ids = base.tokenizer.encode(PROMPT)
    run = GenArm(base, arm, params, prompt_ids=prompt_ids, max_tokens=max_tokens, stop=stop, seed=seed)
    ids, text, finish, details = await run.run()
    assert isinstance(details, GenArmDetails)
    return ids, text, finish, details, base, arm


def product_step(last: str, beta: float) -> dict[str, float]:
    """GenARM's next-word distribution after ``last``: ``p_base · p_arm^(1/beta)``, normalised over the
    base's words (its top 3 are all of them here)."""
    weights = {w: p * ARM[last].get(w, 1e-12) ** (1 / beta) for w, p in BASE[last].items()}
    total = sum(weights.values())
    return {w: v / total for w, v in weights.items()}


def exact_answers(max_tokens: int, beta: float) -> dict[str, float]:
    """Every answer of at most ``max_tokens`` words with its probability under GenARM."""
    answers: dict[str, float] = {}

    def walk(words: list[str], probability: float) -> None:
        if (words and words[-1] == EOS) or len(words) == max_tokens:
            answers[" ".join(w for w in words if w != EOS)] = probability
            return
        for word, p in product_step(words[-1] if words else PROMPT, beta).items():
            walk([*words, word], probability * p)

    walk([], 1.0)
    return answers


async def test_answers_follow_the_product_of_base_and_arm():
    trials, beta = 3000, 0.5
    expected = exact_answers(3, beta)
    counts = Counter()
    for seed in range(trials):
        _, text, *_ = await decode(seed=seed, beta=beta)
        counts[text.strip()] += 1
    assert set(counts) <= set(expected)
    answers = sorted(expected)
    assert chisquare([counts[a] for a in answers], [expected[a] * trials for a in answers]).pvalue > 1e-3


async def test_reported_values_are_the_arms_logprobs():
    *_, details, _, _ = await decode(max_tokens=1)
    step = details.steps[0]
    assert {c.text.strip(): c.q for c in step.candidates} == pytest.approx(
        {w: math.log(p) for w, p in ARM[PROMPT].items()}
    )
    assert {c.text.strip(): c.logprob for c in step.candidates} == pytest.approx(
        {w: math.log(p) for w, p in BASE[PROMPT].items()}
    )


@pytest.mark.parametrize("overrides", [{"beta": 1000.0}, {"top_k": 1}])
async def test_a_vanishing_arm_or_top_k_one_is_the_base_greedy(overrides: dict):
    ids, *_ = await decode(max_tokens=6, temperature=0, **overrides)
    base, _ = engines()
    greedy = await base.generate(PROMPT, SamplingParams(max_tokens=6, temperature=0))
    assert ids == greedy.samples[0].token_ids


async def test_greedy_takes_the_argmax_of_the_product_each_step():
    _, text, finish, *_ = await decode(max_tokens=6, temperature=0, beta=0.5)
    words, last = [], PROMPT
    while len(words) < 6 and last != EOS:
        step = product_step(last, 0.5)
        last = max(step, key=step.__getitem__)
        words.append(last)
    assert text.split() == [w for w in words if w != EOS] and finish == ("stop" if last == EOS else "length")


async def test_a_stop_string_ends_the_answer_before_it():
    # The base's greedy answer is " a a a ...": the stop string is complete after two tokens.
    ids, text, finish, details, *_ = await decode(max_tokens=6, temperature=0, beta=1000.0, stop=("a a", "x"))
    assert (text, finish, len(ids), details.decision_steps) == (" ", "stop", 2, 2)


async def test_one_base_call_and_one_arm_call_of_k_prompts_per_token():
    _, _, _, details, base, arm = await decode(max_tokens=4)
    steps = details.decision_steps
    assert len(base.generate_calls) == steps and arm.batch_calls == steps
    assert len(arm.generate_calls) == sum(len(step.candidates) for step in details.steps)
    assert all(params.prompt_logprobs == 0 for _, params in arm.generate_calls)


async def test_the_log_ratio_is_the_policys_surprise_against_the_base():
    beta = 0.5
    _, text, finish, details, *_ = await decode(max_tokens=3, seed=7, beta=beta)
    words = [PROMPT, *text.split(), *([EOS] if finish == "stop" else [])]
    expected = sum(math.log(product_step(a, beta)[b] / BASE[a][b]) for a, b in itertools.pairwise(words))
    assert details.log_ratio == pytest.approx(expected)


def pipeline(limits: Limits | None = None) -> tuple[Pipeline, WordEngine]:
    base, arm = engines()
    short = WordEngine(ARM, name="short", chat_template=False, vocabulary=base.vocabulary)
    short._info = replace(short.info, max_model_len=4)
    resources = FakeResources(engines={"arm": arm, "short": short, "other": WordEngine(ARM, name="other")})
    return make_pipeline(resources, limits or Limits(max_guided_work=500)), base


async def run(pipe: Pipeline, base: WordEngine, alignment: dict, max_tokens: int = 4):
    request = AlignedRequest(
        engine=base,
        prompt=PromptInput(text=PROMPT),
        sampling=SamplingParams(seed=3),
        alignment=parse_alignment({**alignment, "return_details": True}),
        requested_max_tokens=max_tokens,
    )
    return await pipe.run(await pipe.prepare(request))


async def test_genarm_through_the_pipeline_meters_both_models():
    pipe, base = pipeline()
    result = await run(pipe, base, {"genarm": {"reward_model": "arm", "top_k": 3}})
    details = result.choices[0].details["genarm"]
    assert isinstance(details, GenArmDetails) and details.decision_steps >= 1
    assert set(result.meter.by_model) == {"base", "arm"}


@pytest.mark.parametrize(
    ("alignment", "max_tokens", "param"),
    [
        ({"genarm": {"reward_model": "other"}}, 4, "alignment.genarm.reward_model"),
        ({"genarm": {"reward_model": "missing"}}, 4, "alignment.genarm.reward_model"),
        ({"genarm": {"reward_model": "arm", "top_k": 21}}, 4, "alignment.genarm.top_k"),
        ({"genarm": {"reward_model": "arm", "top_k": 20}}, 30, "alignment.genarm"),
        ({"genarm": {"reward_model": "short"}}, 4, "max_tokens"),
        ({"genarm": {"reward_model": "arm", "beta": 0}}, 4, "alignment.genarm.beta"),
        ({"genarm": {"reward_model": "arm"}, "transfer_q": {"baseline": "arm", "reward": "rm"}}, 4,
         "alignment.transfer_q"),
    ],
)  # fmt: skip
async def test_bad_genarm_requests(alignment: dict, max_tokens: int, param: str):
    pipe, base = pipeline()
    with pytest.raises(InvalidRequestError) as info:
        await run(pipe, base, alignment, max_tokens=max_tokens)
    assert info.value.param == param
