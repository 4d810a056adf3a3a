"""Uncertainty of one greedy answer, and abstention on it (G-NLL; "Alignment for Honesty").

G-NLL ("Rethinking Uncertainty Estimation in Natural Language Generation") is the negative
log-likelihood of the greedy answer, ``-Σ_t log p(y_t | x, y_<t)``: a sound uncertainty from a
single generation, no sampling. The gate stage measures it once per request with one greedy call
of the base (the request's prompt, stop strings and engine constraints; raw log-probabilities,
before processors), and records:

- ``nll``: the G-NLL; ``nll_per_token``: divided by the answer's tokens (its end of sequence included);
- ``min_top1_probability``: the lowest top-1 probability over the answer's positions.

``uncertainty`` only reports them. ``abstain`` answers with its ``answer`` instead of generating
when the chosen measure passes ``threshold`` (every measure grows with uncertainty: ``min_top1`` is
``-log min_top1_probability``), or, with a ``fallback``, lets that profile (or model) answer instead;
otherwise the request runs as asked. A greedy, plain request of one choice reuses the measured answer:
it costs no second call.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Literal

from pydantic import BaseModel, Field

from decoding.base import Candidate, GenerationJob, MethodParams
from models.engine import TokenLogprob
from models.errors import InvalidRequestError

DEFAULT_ABSTENTION = "I am not sure I know the answer to that."


class UncertaintyParams(MethodParams):
    """``alignment.uncertainty``: report the base's uncertainty on this prompt (no parameters)."""


class AbstainParams(MethodParams):
    """``alignment.abstain``: answer "I do not know" (or a fallback) where the base is unsure."""

    threshold: float = Field(ge=0, le=1e6, description="Abstain when the measure is above this.")
    measure: Literal["nll", "nll_per_token", "min_top1"] = Field(
        default="nll_per_token",
        description="G-NLL, G-NLL per token, or -log of the lowest top-1 probability of the greedy answer.",
    )
    answer: str = Field(default=DEFAULT_ABSTENTION, min_length=1, max_length=2000, description="The abstention.")
    fallback: str | None = Field(
        default=None,
        min_length=1,
        description="A profile or model that answers instead of the abstention (the request's prompt and "
        "sampling, the profile's alignment); it may not fall back itself.",
    )


class UncertaintyDetails(BaseModel):
    """The base's greedy answer to this prompt, and how sure it was of it."""

    nll: float = Field(description="G-NLL: -Σ log p of the greedy answer's tokens.")
    nll_per_token: float
    min_top1_probability: float = Field(description="The lowest top-1 probability over the answer's positions.")
    tokens: int


class AbstainDetails(BaseModel):
    measure: str
    value: float
    threshold: float
    abstained: bool
    fallback: str | None = Field(default=None, description="The profile that answered instead, if one did.")
    uncertainty: UncertaintyDetails


def uncertainty_of(logprobs: list[TokenLogprob]) -> UncertaintyDetails:
    """G-NLL and the lowest top-1 probability of a greedy answer's token logprobs (top-1 alternatives included)."""
    nll = -sum(record.logprob for record in logprobs)
    top1 = [math.exp(max((alt.logprob for alt in record.top), default=record.logprob)) for record in logprobs]
    return UncertaintyDetails(
        nll=nll, nll_per_token=nll / len(logprobs) if logprobs else 0.0,
        min_top1_probability=min(top1, default=1.0), tokens=len(logprobs),
    )  # fmt: skip


def measured(uncertainty: UncertaintyDetails, measure: str) -> float:
    if measure == "min_top1":
        return -math.log(max(uncertainty.min_top1_probability, 1e-300))
    return uncertainty.nll if measure == "nll" else uncertainty.nll_per_token


async def greedy_answer(job: GenerationJob) -> tuple[Candidate, UncertaintyDetails]:
    """One greedy call of the base: its answer (logprobs as the request asked, at least the top-1) and its
    uncertainty."""
    sampling = replace(job.sampling, n=1, temperature=0.0, seed=None, logprobs=max(1, job.sampling.logprobs or 0))
    sample = (await job.engine.generate(job.prompt_ids, sampling)).samples[0]
    logprobs = sample.logprobs or []
    candidate = Candidate(sample.text, sample.token_ids, sample.finish_reason, logprobs)
    return candidate, uncertainty_of(logprobs)


def _needs_logprobs(job: GenerationJob, method: str) -> None:
    if job.engine.info.max_logprobs < 1:
        raise InvalidRequestError(
            f"`alignment.{method}` needs token logprobs, which `{job.engine.info.name}` does not return.",
            param=f"alignment.{method}",
        )


class UncertaintyGate:
    """``uncertainty`` as a gate: it never abstains, it reports."""

    def check(self, params: UncertaintyParams, job: GenerationJob) -> None:
        _needs_logprobs(job, "uncertainty")

    def verdict(self, params: UncertaintyParams, uncertainty: UncertaintyDetails) -> tuple[str | None, BaseModel]:
        return None, uncertainty


class AbstainGate:
    """``abstain`` as a gate: the abstention when the measure passes the threshold."""

    def check(self, params: AbstainParams, job: GenerationJob) -> None:
        _needs_logprobs(job, "abstain")

    def verdict(self, params: AbstainParams, uncertainty: UncertaintyDetails) -> tuple[str | None, BaseModel]:
        value = measured(uncertainty, params.measure)
        abstained = value > params.threshold
        details = AbstainDetails(measure=params.measure, value=value, threshold=params.threshold, abstained=abstained,
                                 fallback=params.fallback if abstained else None, uncertainty=uncertainty)  # fmt: skip
        return (params.answer if abstained else None), details
