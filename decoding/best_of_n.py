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
``mean_minus_std`` (``mean - k * std``). Ties take the lowest index.

``calibrate`` (InfAlign, Balashankar et al. 2024) replaces each scorer's reward by its
quantile among ``references`` samples of the base drawn for the same prompt (one more
engine call, counted in ``usage``): ``r_cal(y) = (#{r(y') < r(y)} + #{r(y') = r(y)} / 2) / M``,
then transformed for the procedure: ``best_of_n``: ``exp(t · r_cal)``, ``worst_of_n``:
``-exp(-t · r_cal)``. Calibration is monotone per scorer, so a single scorer's ``max`` and
``min`` choices do not change; it puts scorers of different scales on one scale before
they are aggregated. A client
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
from dataclasses import replace
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field, field_validator

from decoding.base import Candidate, GenerationJob, Limits, MethodParams, Resources
from models.engine import SamplingParams
from models.errors import InvalidRequestError
from models.scorers import Scorer

_NUMBER = re.compile(r"-?\d+(?:[.,]\d+)*")
MAX_CANDIDATE_CHARS = 512
REFERENCE_SEED_OFFSET = 1_000_003
"""Reference samples are seeded ``seed + offset``: not the candidates' own draws."""


class CalibrationParams(MethodParams):
    """``alignment.best_of_n.calibrate``: rewards as quantiles among samples of the base (InfAlign)."""

    references: int = Field(
        default=16, ge=1, le=64, description="Reference samples of the base per prompt, sampled as the request is."
    )
    transform: Literal["none", "best_of_n", "worst_of_n"] = Field(
        default="none", description="InfAlign's transform of the calibrated reward: exp(t·u), -exp(-t·u), or u."
    )
    t: float = Field(default=1.0, gt=0, le=100, description="The transform's temperature.")


class BestOfNParams(MethodParams):
    """``alignment.best_of_n``: draw N candidates, score them with reward scorers, keep the best."""

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
    calibrate: CalibrationParams | None = Field(
        default=None, description="Rewards as quantiles among samples of the base (InfAlign)."
    )

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
    reward: float = Field(description="What selection used: the aggregate of `rewards`, or of `calibrated`.")
    rewards: dict[str, float]
    calibrated: dict[str, float] | None = Field(
        default=None, description="`calibrate`: each scorer's transformed quantile among the references."
    )
    text: str = Field(description=f"The candidate's text (its first {MAX_CANDIDATE_CHARS} characters).")
    truncated: bool = Field(description="The text was cut to its first characters.")


class BestOfNDetails(BaseModel):
    """Per returned choice: which candidate it is, and how all N scored."""

    select: str
    n: int
    chosen: int = Field(description="The index of this choice among the N candidates.")
    rank: int = Field(description="Its place in the selection order (0 = selected first).")
    candidates: list[CandidateScore]
    reference_rewards: dict[str, list[float]] | None = Field(
        default=None, description="`calibrate`: each scorer's rewards of the reference samples."
    )


REWARD_PARAM = "alignment.best_of_n.reward"


def resolve_scorers(names: Sequence[str], resources: Resources, *, param: str) -> list[Scorer]:
    """Resolves reward names now, so a bad name fails before any generation (a 400 naming ``param``)."""
    return [resources.scorer(name, param=param) for name in names]


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


def calibrated(rewards: Sequence[float], references: Sequence[float]) -> list[float]:
    """Each reward's empirical quantile among the references (ties count half)."""
    ordered = np.sort(np.asarray(references, dtype=np.float64))
    values = np.asarray(rewards, dtype=np.float64)
    below = np.searchsorted(ordered, values, side="left")
    at_most = np.searchsorted(ordered, values, side="right")
    return ((below + at_most) / (2 * len(ordered))).tolist()


def transformed(quantiles: Sequence[float], calibration: CalibrationParams) -> list[float]:
    values = np.asarray(quantiles, dtype=np.float64)
    if calibration.transform == "best_of_n":
        return np.exp(calibration.t * values).tolist()
    if calibration.transform == "worst_of_n":
        return (-np.exp(-calibration.t * values)).tolist()
    return values.tolist()


def calibrate_rewards(
    rewards: Sequence[dict[str, float]], references: Sequence[dict[str, float]], calibration: CalibrationParams
) -> list[dict[str, float]]:
    """Every candidate's rewards, scorer by scorer, as transformed quantiles among the references'."""
    if not rewards:
        return []
    by_scorer = {
        name: transformed(calibrated([r[name] for r in rewards], [r[name] for r in references]), calibration)
        for name in rewards[0]
    }
    return [{name: values[i] for name, values in by_scorer.items()} for i in range(len(rewards))]


def canonical_answer(text: str, how: str) -> str:
    if how == "last_number":
        numbers = _NUMBER.findall(text)
        return numbers[-1].replace(",", "") if numbers else ""
    return " ".join(text.lower().split()).rstrip(".")


def selection_order(
    rewards: Sequence[float],
    texts: Sequence[str],
    params: BestOfNParams,
    rng: random.Random,
    tiebreak: Sequence[float] | None = None,
) -> list[int]:
    """Candidate indices in the order they are returned (the first is "the" selection). ``max`` and ``min``
    break ties by ``tiebreak`` (the raw rewards of calibrated ones: above every reference, two candidates
    share a quantile), then by index."""
    indices = list(range(len(rewards)))
    second = tiebreak if tiebreak is not None else [0.0] * len(rewards)
    if params.select == "max":
        return sorted(indices, key=lambda i: (-rewards[i], -second[i], i))
    if params.select == "min":
        return sorted(indices, key=lambda i: (rewards[i], second[i], i))
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
        if params.calibrate is not None and sampling.temperature == 0:
            raise InvalidRequestError(
                "`alignment.best_of_n.calibrate` needs sampled references: set `temperature` above 0.",
                param="alignment.best_of_n.calibrate",
            )
        resolve_scorers(params.rewards, resources, param=REWARD_PARAM)

    def samples(self, params: BestOfNParams) -> int:
        return params.n

    def base_samples(self, params: BestOfNParams) -> int:
        return 0 if params.calibrate is None else params.calibrate.references

    async def select(
        self, params: BestOfNParams, candidates: list[Candidate], job: GenerationJob, resources: Resources
    ) -> list[Candidate]:
        texts = [candidate.text for candidate in candidates]
        references = await self._references(params, job)
        scorers = resolve_scorers(params.rewards, resources, param=REWARD_PARAM)
        scored = await score_candidates(scorers, job.prompt_text, texts + references)
        rewards_by_scorer, reference_rewards = scored[: len(texts)], scored[len(texts) :]
        used = rewards_by_scorer
        if params.calibrate is not None:
            used = calibrate_rewards(rewards_by_scorer, reference_rewards, params.calibrate)
        rewards = aggregate(used, params.aggregate, params.k)
        seed = params.seed if params.seed is not None else job.sampling.seed
        # Hashed from a string: independent of the engine's use of the same request seed.
        rng = random.Random(f"best_of_n/{seed}") if seed is not None else random.Random()
        raw = aggregate(rewards_by_scorer, params.aggregate, params.k) if params.calibrate is not None else None
        order = selection_order(rewards, texts, params, rng, raw)
        scores = [
            CandidateScore(
                index=i, reward=rewards[i], rewards=rewards_by_scorer[i],
                calibrated=used[i] if params.calibrate is not None else None, text=text[:MAX_CANDIDATE_CHARS],
                truncated=len(text) > MAX_CANDIDATE_CHARS,
            )
            for i, text in enumerate(texts)
        ]  # fmt: skip
        by_scorer = None
        if params.calibrate is not None:
            by_scorer = {name: [r[name] for r in reference_rewards] for name in params.rewards}
        chosen = []
        for rank, index in enumerate(order[: job.sampling.n]):
            candidate = candidates[index]
            candidate.details["best_of_n"] = BestOfNDetails(
                select=params.select, n=params.n, chosen=index, rank=rank, candidates=scores,
                reference_rewards=by_scorer,
            )  # fmt: skip
            chosen.append(candidate)
        return chosen

    @staticmethod
    async def _references(params: BestOfNParams, job: GenerationJob) -> list[str]:
        """``calibrate``: samples of the base for the same prompt, seeded apart from the candidates."""
        if params.calibrate is None:
            return []
        seed = None if job.sampling.seed is None else job.sampling.seed + REFERENCE_SEED_OFFSET
        sampling = replace(job.sampling, n=params.calibrate.references, seed=seed, logprobs=None, prompt_logprobs=None)
        completion = await job.engine.generate(job.prompt_ids, sampling)
        return [sample.text for sample in completion.samples]
