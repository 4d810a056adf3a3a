"""Early-rejection best-of-N against a word LM with exact next-word tables and a scorer that counts words."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from decoding.alignment import parse_alignment
from decoding.base import Limits, PromptInput
from decoding.early_rejection import survivors
from decoding.pipeline import AlignedRequest, Pipeline
from models.engine import SamplingParams
from models.errors import InvalidRequestError
from tests.fakes import EOS, FakeResources, WordEngine, make_pipeline

# An answer starts "good" or "bad" with even odds and mostly stays as it started (so a partial answer's reward
# predicts the whole one's, as early rejection assumes); it ends with probability 0.1 after each word.
TABLE = {
    "go": {"good": 0.45, "bad": 0.45, EOS: 0.1},
    "good": {"good": 0.8, "bad": 0.1, EOS: 0.1},
    "bad": {"bad": 0.8, "good": 0.1, EOS: 0.1},
}
SEEDS = range(20)


class GoodWords:
    """Reward: the share of "good" words in the response (partial or not; 0 for an empty one)."""

    name = "rm"

    def __init__(self) -> None:
        self.batches: list[int] = []

    async def score(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        self.batches.append(len(pairs))
        return [response.split().count("good") / max(len(response.split()), 1) for _, response in pairs]

    async def close(self) -> None:
        return None


def setup() -> tuple[Pipeline, WordEngine, GoodWords]:
    scorer = GoodWords()
    resources = FakeResources(engines={"nudger": WordEngine(TABLE, name="nudger")}, scorers=[scorer])
    return make_pipeline(resources, Limits(max_best_of_n=64)), WordEngine(TABLE), scorer


async def run(pipe: Pipeline, engine: WordEngine, alignment: dict, *, seed: int, max_tokens: int = 16):
    request = AlignedRequest(
        engine=engine, prompt=PromptInput(text="go"), sampling=SamplingParams(seed=seed),
        alignment=parse_alignment({**alignment, "return_details": True}), requested_max_tokens=max_tokens,
    )  # fmt: skip
    return await pipe.run(await pipe.prepare(request))


async def test_with_rejection_rate_0_it_is_best_of_n_exactly():
    pipe, engine, _ = setup()
    for seed in SEEDS:
        early = await run(pipe, engine, {"early_rejection": {"n": 8, "reward": "rm", "rejection_rate": 0}}, seed=seed)
        best = await run(pipe, engine, {"best_of_n": {"n": 8, "reward": "rm"}}, seed=seed)
        assert early.choices[0].token_ids == best.choices[0].token_ids
        assert early.choices[0].details["early_rejection"].chosen == best.choices[0].details["best_of_n"].chosen


async def test_survivors_continue_from_their_own_token_ids_and_the_worst_are_dropped():
    pipe, engine, scorer = setup()
    alignment = {"early_rejection": {"n": 8, "reward": "rm", "first_checkpoint": 2, "rejection_rate": 0.5, "rounds": 2}}
    result = await run(pipe, engine, alignment, seed=3)
    details = result.choices[0].details["early_rejection"]
    assert [c.tokens for c in details.checkpoints] == [2, 4][: len(details.checkpoints)]
    first = engine.generate_calls[0]
    assert first[1].n == 8 and first[1].max_tokens == 2
    continued = [ids for ids, params in engine.generate_calls[1:] if params.n == 1]
    prompt = first[0]
    assert continued and all(ids[: len(prompt)] == prompt and len(ids) > len(prompt) for ids in continued)
    assert details.checkpoints[0].running <= 8 and len(details.checkpoints[0].kept) == survivors(8, 0.5)
    assert len(scorer.batches) >= 2


async def test_it_keeps_best_of_ns_reward_with_fewer_tokens():
    rewards, tokens, best_rewards, best_tokens = [], [], [], []
    for seed in SEEDS:
        pipe, engine, _ = setup()
        alignment = {"early_rejection": {"n": 16, "reward": "rm", "first_checkpoint": 2, "rejection_rate": 0.75}}
        early = await run(pipe, engine, alignment, seed=seed)
        rewards.append(early.choices[0].details["early_rejection"].reward)
        tokens.append(early.meter.completion_tokens)
        best = await run(pipe, engine, {"best_of_n": {"n": 16, "reward": "rm"}}, seed=seed)
        best_rewards.append(
            best.choices[0].details["best_of_n"].candidates[best.choices[0].details["best_of_n"].chosen].reward
        )
        best_tokens.append(best.meter.completion_tokens)
    print(f"\nearly rejection / best-of-16: tokens {sum(tokens) / sum(best_tokens):.2f}, "
          f"reward {sum(rewards) / sum(best_rewards):.2f}")  # fmt: skip
    assert sum(tokens) < 0.6 * sum(best_tokens)
    assert sum(rewards) > 0.7 * sum(best_rewards)


@pytest.mark.parametrize(
    ("alignment", "param"),
    [
        ({"early_rejection": {"reward": "rm", "rejection_rate": 1.0}}, "alignment.early_rejection.rejection_rate"),
        ({"early_rejection": {"reward": "rm", "n": 65}}, "alignment.early_rejection.n"),
        ({"early_rejection": {"reward": "nope"}}, "alignment.early_rejection.reward"),
        ({"early_rejection": {"reward": "rm"}, "best_of_n": {"reward": "rm"}}, "alignment.best_of_n"),
        ({"early_rejection": {"reward": "rm"}, "nudging": {"nudger": "nudger"}}, "alignment.early_rejection"),
    ],
)  # fmt: skip
async def test_what_cannot_work_is_refused_before_any_generation(alignment: dict, param: str):
    pipe, engine, _ = setup()
    with pytest.raises(InvalidRequestError) as refused:
        await run(pipe, engine, alignment, seed=0)
    assert refused.value.param == param
    assert engine.generate_calls == []
