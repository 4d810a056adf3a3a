"""Best-of-N and relatives (Beirami et al. 2024; Yang et al. 2024; Balashankar et al. 2024).

Draw N candidates from the generation strategy (the plain strategy: one engine
call with ``n = N``), score all of them in one batched call per scorer, and
return the selected one(s):

- ``max``: best-of-N, the highest reward; ``min``: worst-of-N (red-teaming);
- ``soft``: sample index i with probability ``exp(r_i / lambda) / Σ exp(r_j / lambda)``
  (lambda -> 0 is best-of-N, lambda -> inf is plain sampling);
- ``vote``: self-consistency: the most common canonicalised answer (optionally
  each vote weighted by ``exp(r_i / lambda)``); the group's best candidate is returned.

Several scorers form an ensemble aggregated by ``mean``, ``min`` (worst case) or
``mean_minus_std`` (``mean - k * std``). Ties take the lowest index. A client
``n`` > 1 returns the top n of the N candidates in selection order. The details of
every returned choice list all N candidates with their rewards and (the first
``MAX_CANDIDATE_CHARS`` characters of) their text, so a client sees what lost.
"""

from __future__ import annotations

import asyncio
import math
import random
import re
from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field, field_validator

from decoding.base import Candidate, GenerationJob, Limits, MethodParams, Resources
from models.engine import SamplingParams
from models.errors import InvalidRequestError
from models.scorers import Scorer

_NUMBER = re.compile(r"-?\d+(?:[.,]\d+)*")
MAX_CANDIDATE_CHARS = 512


class BestOfNParams(MethodParams):
    """``alignment.best_of_n``."""

    n: int = Field(default=4, ge=1, le=64, description="Candidates drawn (also bounded by the server's limits).")
    reward: str | list[str] = Field(description="A scorer name, or several for an ensemble.")
    select: Literal["max", "min", "soft", "vote"] = "max"
    lambda_: float = Field(
        default=1.0, gt=0, alias="lambda", description="Temperature of `soft` (and weighted `vote`)."
    )
    aggregate: Literal["mean", "min", "mean_minus_std"] = "mean"
    k: float = Field(default=1.0, ge=0, description="`mean_minus_std`: the weight of the std.")
    vote_weighting: Literal["count", "reward"] = "count"
    canonical: Literal["text", "last_number"] = Field(
        default="text", description="`vote`: how answers are compared: normalised text, or their last number."
    )
    seed: int | None = Field(default=None, description="`soft`: seeds the choice (default: the request's seed).")

    @field_validator("reward")
    @classmethod
    def _some_reward(cls, reward: str | list[str]) -> str | list[str]:
        if isinstance(reward, list) and not reward:
            raise ValueError("name at least one scorer")
        return reward

    @property
    def rewards(self) -> list[str]:
        return [self.reward] if isinstance(self.reward, str) else list(self.reward)


class CandidateScore(BaseModel):
    index: int
    reward: float
    rewards: dict[str, float]
    text: str = Field(description=f"The candidate's text (its first {MAX_CANDIDATE_CHARS} characters).")
    truncated: bool = Field(description="The text was cut to its first characters.")


class BestOfNDetails(BaseModel):
    """Per returned choice: which candidate it is, and how all N scored."""

    select: str
    n: int
    chosen: int = Field(description="The index of this choice among the N candidates.")
    rank: int = Field(description="Its place in the selection order (0 = selected first).")
    candidates: list[CandidateScore]


def scorers_for(params: BestOfNParams, resources: Resources) -> list[Scorer]:
    """Resolves the reward names now, so a bad name fails before any generation."""
    return [resources.scorer(name, param="alignment.best_of_n.reward") for name in params.rewards]


async def score_candidates(scorers: Sequence[Scorer], prompt: str, responses: Sequence[str]) -> list[dict[str, float]]:
    """Each scorer scores all candidates in one batched call; returns every scorer's reward per candidate."""
    pairs = [(prompt, response) for response in responses]
    results = await asyncio.gather(*(scorer.score(pairs) for scorer in scorers))
    return [
        {scorer.name: scores[i] for scorer, scores in zip(scorers, results, strict=True)} for i in range(len(pairs))
    ]


def aggregate(rewards: Sequence[dict[str, float]], how: str, k: float) -> list[float]:
    values = np.array([list(r.values()) for r in rewards], dtype=np.float64)
    if how == "min":
        return values.min(axis=1).tolist()
    if how == "mean_minus_std":
        return (values.mean(axis=1) - k * values.std(axis=1)).tolist()
    return values.mean(axis=1).tolist()


def canonical_answer(text: str, how: str) -> str:
    if how == "last_number":
        numbers = _NUMBER.findall(text)
        return numbers[-1].replace(",", "") if numbers else ""
    return " ".join(text.lower().split()).rstrip(".")


def selection_order(
    rewards: Sequence[float], texts: Sequence[str], params: BestOfNParams, rng: random.Random
) -> list[int]:
    """Candidate indices in the order they are returned (the first is "the" selection)."""
    indices = list(range(len(rewards)))
    if params.select == "max":
        return sorted(indices, key=lambda i: (-rewards[i], i))
    if params.select == "min":
        return sorted(indices, key=lambda i: (rewards[i], i))
    if params.select == "soft":
        return _soft_order(rewards, params.lambda_, rng)
    return _vote_order(rewards, texts, params)


def soft_probabilities(rewards: Sequence[float], lam: float) -> list[float]:
    top = max(rewards)
    weights = [math.exp((r - top) / lam) for r in rewards]
    total = sum(weights)
    return [w / total for w in weights]


def _soft_order(rewards: Sequence[float], lam: float, rng: random.Random) -> list[int]:
    """Samples without replacement, each draw ∝ exp(r / lambda) over the remaining candidates."""
    remaining = list(range(len(rewards)))
    order = []
    while remaining:
        probabilities = soft_probabilities([rewards[i] for i in remaining], lam)
        pick = rng.choices(range(len(remaining)), weights=probabilities)[0]
        order.append(remaining.pop(pick))
    return order


def _vote_order(rewards: Sequence[float], texts: Sequence[str], params: BestOfNParams) -> list[int]:
    groups: dict[str, list[int]] = {}
    for i, text in enumerate(texts):
        groups.setdefault(canonical_answer(text, params.canonical), []).append(i)
    top = max(rewards)

    def weight(members: list[int]) -> float:
        if params.vote_weighting == "count":
            return float(len(members))
        return sum(math.exp((rewards[i] - top) / params.lambda_) for i in members)

    # Groups by weight (ties: the group whose first member comes first); members by reward, then index.
    ranked = sorted(groups.values(), key=lambda members: (-weight(members), members[0]))
    return [i for members in ranked for i in sorted(members, key=lambda i: (-rewards[i], i))]


class BestOfNSelection:
    """Best-of-N as the pipeline's selection stage."""

    def check(self, params: BestOfNParams, sampling: SamplingParams, resources: Resources, limits: Limits) -> None:
        if params.n > limits.max_best_of_n:
            raise InvalidRequestError(
                f"`alignment.best_of_n.n` must be at most {limits.max_best_of_n}, got {params.n}.",
                param="alignment.best_of_n.n",
            )
        if sampling.n > params.n:
            raise InvalidRequestError(
                f"`n` ({sampling.n}) cannot exceed the {params.n} candidates of best_of_n.", param="n"
            )
        scorers_for(params, resources)

    def samples(self, params: BestOfNParams) -> int:
        return params.n

    async def select(
        self, params: BestOfNParams, candidates: list[Candidate], job: GenerationJob, resources: Resources
    ) -> list[Candidate]:
        texts = [candidate.text for candidate in candidates]
        rewards_by_scorer = await score_candidates(scorers_for(params, resources), job.prompt_text, texts)
        rewards = aggregate(rewards_by_scorer, params.aggregate, params.k)
        seed = params.seed if params.seed is not None else job.sampling.seed
        # Hashed from a string: independent of the engine's use of the same request seed.
        rng = random.Random(f"best_of_n/{seed}") if seed is not None else random.Random()
        order = selection_order(rewards, texts, params, rng)
        scores = [
            CandidateScore(
                index=i, reward=rewards[i], rewards=rewards_by_scorer[i], text=text[:MAX_CANDIDATE_CHARS],
                truncated=len(text) > MAX_CANDIDATE_CHARS,
            )
            for i, text in enumerate(texts)
        ]  # fmt: skip
        chosen = []
        for rank, index in enumerate(order[: job.sampling.n]):
            candidate = candidates[index]
            candidate.details["best_of_n"] = BestOfNDetails(
                select=params.select, n=params.n, chosen=index, rank=rank, candidates=scores
            )
            chosen.append(candidate)
        return chosen
