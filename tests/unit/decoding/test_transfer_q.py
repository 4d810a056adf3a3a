"""Transfer-Q* on a tabular toy: a few tokens, a bigram base, a deterministic baseline, rewards on text."""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Callable

import numpy as np
import pytest
from scipy.stats import chisquare

from decoding.alignment import parse_alignment
from decoding.base import Limits, PromptInput
from decoding.pipeline import AlignedRequest, Pipeline
from decoding.token_guidance import decision_probabilities
from decoding.transfer_q import TransferQ, TransferQParams, self_normalised_q
from models.engine import SamplingParams
from models.errors import InvalidRequestError
from tests.fakes import EOS, FakeResources, WordEngine, make_pipeline

BASE = {
    "go": {"a": 0.5, "b": 0.3, "c": 0.2},
    "a": {"a": 0.6, "b": 0.4},
    "b": {"c": 0.7, EOS: 0.3},
    "c": {"a": 0.5, EOS: 0.5},
}
BASELINE = {"go": {"b": 1.0}, "a": {"b": 1.0}, "b": {"c": 1.0}, "c": {EOS: 1.0}}  # deterministic rollouts
PROMPT = "go"


def reward_of(text: str) -> float:
    words = text.split()
    return 1.0 * words.count("c") + 0.5 * words.count("b") - 0.3 * words.count("a")


class FunctionScorer:
    def __init__(self, function: Callable[[str], float], name: str = "rm") -> None:
        self.name, self.function, self.batches = name, function, []

    async def score(self, pairs):  # type: ignore[no-untyped-def]
        self.batches.append(len(pairs))
        return [self.function(response) for _, response in pairs]

    async def close(self) -> None:
        return None


def engines() -> tuple[WordEngine, WordEngine]:
    shared: dict[str, int] = {}
    base = WordEngine(BASE, name="base", chat_template=False, vocabulary=shared)
    baseline = WordEngine(BASELINE, name="baseline", vocabulary=shared)
    return base, baseline


def exact_q(prefix: list[str], rollout_tokens: int) -> float:
    """Q*(s, z): the reward after the baseline's (deterministic) rollout from s + z."""
    words = list(prefix)
    for _ in range(rollout_tokens):
        if words[-1] == EOS:
            break
        words.append(max(BASELINE.get(words[-1], {EOS: 1.0}).items(), key=lambda item: item[1])[0])
    return reward_of(" ".join(w for w in words if w != EOS))


async def decode(
    scorer: FunctionScorer | None = None, *, max_tokens: int = 6, seed: int | None = 0, **overrides: object
) -> tuple[list[int], str, str, object, WordEngine, WordEngine]:
    base, baseline = engines()
    params = TransferQParams.model_validate({"baseline": "baseline", "reward": "rm", "top_k": 3, "rollout_tokens": 4,
                                             **overrides})  # fmt: skip
    run = TransferQ(
        base,
        baseline,
        scorer or FunctionScorer(reward_of),
        params,
        prompt_ids=base.tokenizer.encode(PROMPT),
        prompt_text=PROMPT,
        max_tokens=max_tokens,
        baseline_reward=FunctionScorer(reward_of, "same") if params.mode == "indirect" else None,
        seed=seed,
    )
    ids, text, finish, details = await run.run()
    return ids, text, finish, details, base, baseline


async def test_with_exact_q_the_choice_follows_the_closed_form():
    trials, alpha = 3000, 1.5
    counts = Counter()
    for seed in range(trials):
        _, text, *_ = await decode(max_tokens=1, seed=seed, alpha=alpha, temperature=1.0)
        counts[text.split()[0]] += 1
    top = sorted(BASE["go"].items(), key=lambda item: -item[1])
    q = [exact_q([word], 4) for word, _ in top]
    expected = decision_probabilities([math.log(p) for _, p in top], q, alpha)
    assert chisquare([counts[w] for w, _ in top], expected * trials).pvalue > 1e-3


async def test_reported_q_values_are_the_exact_ones():
    *_, details, _, _ = await decode(max_tokens=1)
    step = details.steps[0]  # type: ignore[attr-defined]
    assert [c.q for c in step.candidates] == pytest.approx([exact_q([c.text.strip()], 4) for c in step.candidates])


async def greedy_base(max_tokens: int = 6) -> list[int]:
    base, _ = engines()
    completion = await base.generate(PROMPT, SamplingParams(max_tokens=max_tokens, temperature=0))
    return completion.samples[0].token_ids


@pytest.mark.parametrize("overrides", [{"alpha": 0.0}, {"top_k": 1}])
async def test_alpha_zero_or_top_k_one_is_the_base_choice(overrides: dict):
    ids, *_ = await decode(**overrides)
    assert ids == await greedy_base()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
async def test_reward_shift_and_scale(temperature: float):
    reference, *_ = await decode(alpha=2.0, temperature=temperature)
    shifted, *_ = await decode(FunctionScorer(lambda t: reward_of(t) + 7.0), alpha=2.0, temperature=temperature)
    scaled, *_ = await decode(FunctionScorer(lambda t: 4.0 * reward_of(t)), alpha=0.5, temperature=temperature)
    assert shifted == reference and scaled == reference


async def test_expected_reward_and_kl_grow_with_alpha():
    *_, details, _, _ = await decode(max_tokens=1)
    step = details.steps[0]  # type: ignore[attr-defined]
    logp = np.array([c.logprob for c in step.candidates])
    q = np.array([c.q for c in step.candidates])
    base = np.exp(logp) / np.exp(logp).sum()
    rewards, kls = [], []
    for alpha in (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0):
        pi = decision_probabilities(logp, q, alpha)
        rewards.append(float(pi @ q))
        kls.append(float(np.sum(pi * np.log(pi / base))))
    assert all(b >= a - 1e-12 for a, b in itertools.pairwise(rewards))
    assert all(b >= a - 1e-12 for a, b in itertools.pairwise(kls))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
async def test_indirect_with_the_same_reward_equals_direct(temperature: float):
    direct, *_ = await decode(alpha=2.0, temperature=temperature, rollouts=3)
    indirect, *_ = await decode(alpha=2.0, temperature=temperature, rollouts=3, mode="indirect",
                                baseline_reward="same")  # fmt: skip
    assert indirect == direct
    assert self_normalised_q([1.0, 2.0, 4.0], [1.0, 2.0, 4.0], beta=0.5) == pytest.approx(7 / 3)


async def test_args_scores_the_partial_text_without_rollouts():
    scorer = FunctionScorer(reward_of)
    _, _, _, details, _, baseline = await decode(scorer, rollout_tokens=0, max_tokens=2)
    assert baseline.batch_calls == 0
    first = details.steps[0]  # type: ignore[attr-defined]
    assert [c.q for c in first.candidates] == pytest.approx([reward_of(c.text) for c in first.candidates])


async def test_blockwise_with_one_block_is_best_of_k():
    scorer = FunctionScorer(reward_of)
    _, text, _, details, base, _ = await decode(scorer, block_tokens=6, max_tokens=6, alpha=1000.0, top_k=4,
                                                rollout_tokens=0, temperature=0.0)  # fmt: skip
    assert details.decision_steps == 1  # type: ignore[attr-defined]
    blocks = details.steps[0].candidates  # type: ignore[attr-defined]
    assert reward_of(text) == max(reward_of(c.text) for c in blocks)
    assert [params.n for _, params in base.generate_calls] == [4]


async def test_one_base_call_one_batched_rollout_call_one_reward_call_per_step():
    scorer = FunctionScorer(reward_of)
    _, _, _, details, base, baseline = await decode(scorer, rollouts=2, max_tokens=3)
    steps = details.decision_steps  # type: ignore[attr-defined]
    assert len(base.generate_calls) == steps and baseline.batch_calls == steps
    candidates = [len(step.candidates) for step in details.steps]  # type: ignore[attr-defined]
    assert scorer.batches == [2 * k for k in candidates]  # candidates x rollouts pairs, one batch per step


def pipeline() -> tuple[Pipeline, WordEngine]:
    base, baseline = engines()
    other = WordEngine(BASELINE, name="other-tokenizer")
    resources = FakeResources(
        engines={"baseline": baseline, "other": other},
        scorers=[FunctionScorer(reward_of), FunctionScorer(reward_of, "r2")],
    )
    return make_pipeline(resources, Limits(max_guided_work=500)), base


def aligned(base: WordEngine, alignment: dict, max_tokens: int = 4, n: int = 1) -> AlignedRequest:
    return AlignedRequest(
        engine=base,
        prompt=PromptInput(text=PROMPT),
        sampling=SamplingParams(n=n),
        alignment=parse_alignment({**alignment, "return_details": True}),
        requested_max_tokens=max_tokens,
    )


async def run(pipe: Pipeline, base: WordEngine, alignment: dict, max_tokens: int = 4):
    return await pipe.run(await pipe.prepare(aligned(base, alignment, max_tokens)))


async def test_transfer_q_through_the_pipeline():
    pipe, base = pipeline()
    result = await run(pipe, base, {"transfer_q": {"baseline": "baseline", "reward": "rm", "top_k": 3}})
    assert result.choices[0].details["transfer_q"].decision_steps >= 1
    assert set(result.meter.by_model) == {"base", "baseline"}


async def test_the_work_of_a_request_counts_every_rollout():
    pipe, base = pipeline()
    params = {"baseline": "baseline", "reward": "rm", "top_k": 3, "rollouts": 2, "rollout_tokens": 5}
    prepared = await pipe.prepare(aligned(base, {"transfer_q": params}, max_tokens=4, n=2))
    assert prepared.sampling_work == 2 * 4 * 3  # answers x max_tokens x (base, baseline, reward)
    assert prepared.work == prepared.sampling_work + 2 * 4 * (3 * 2 * (5 + 1))  # + answers x steps x step's work


@pytest.mark.parametrize(
    ("alignment", "param"),
    [
        ({"transfer_q": {"baseline": "other", "reward": "rm"}}, "alignment.transfer_q.baseline"),
        ({"transfer_q": {"baseline": "missing", "reward": "rm"}}, "alignment.transfer_q.baseline"),
        ({"transfer_q": {"baseline": "baseline", "reward": "nope"}}, "alignment.transfer_q.reward"),
        ({"transfer_q": {"baseline": "baseline", "reward": "rm", "top_k": 21}}, "alignment.transfer_q.top_k"),
        ({"transfer_q": {"baseline": "baseline", "reward": "rm", "rollout_tokens": 200}}, "alignment.transfer_q"),
        ({"transfer_q": {"baseline": "baseline", "reward": "rm", "mode": "indirect"}}, "alignment.transfer_q"),
        ({"transfer_q": {"baseline": "baseline", "reward": "rm"}, "nudging": {"nudger": "baseline"}},
         "alignment.nudging"),
    ],
)  # fmt: skip
async def test_bad_transfer_q_requests(alignment: dict, param: str):
    pipe, base = pipeline()
    with pytest.raises(InvalidRequestError) as info:
        await run(pipe, base, alignment, max_tokens=10)
    assert info.value.param == param


async def test_the_log_ratio_at_temperature_zero_is_the_answers_surprise_under_the_base():
    _, text, finish, details, _, _ = await decode(temperature=0.0, alpha=2.0)
    words = [PROMPT, *text.split(), *([EOS] if finish == "stop" else [])]
    surprise = -sum(math.log(BASE[a][b]) for a, b in itertools.pairwise(words))
    assert details.log_ratio == pytest.approx(surprise)  # type: ignore[attr-defined]


async def test_the_mean_log_ratio_estimates_the_kl_from_the_base():
    alpha, trials = 1.5, 2000
    ratios = []
    for seed in range(trials):
        *_, details, _, _ = await decode(max_tokens=1, seed=seed, alpha=alpha, temperature=1.0)
        ratios.append(details.log_ratio)  # type: ignore[attr-defined]
    step = details.steps[0]  # type: ignore[attr-defined]
    logp = np.array([c.logprob for c in step.candidates])
    pi = decision_probabilities(logp, [c.q for c in step.candidates], alpha)
    kl = float(np.sum(pi * (np.log(pi) - logp)))  # the top 3 of "go" are all of the base's mass there
    assert np.mean(ratios) == pytest.approx(kl, abs=4 * np.std(ratios) / math.sqrt(trials))
