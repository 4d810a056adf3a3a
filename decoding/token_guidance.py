"""Token-level guided decoding, which Transfer-Q* and GenARM share: the base proposes, a value guides.

At each decision step, from the state ``s`` (prompt + answer so far, as the base's token ids):

1. candidates: the base's top-``k`` next tokens (``block_tokens = 1``), or ``k`` blocks of
   ``block_tokens`` tokens sampled from the base;
2. a value ``v(s, z)`` per candidate, which the method computes (``GuidedDecoding.values``);
3. the choice: ``argmax(logp_base(z) + alpha · v(z))`` at ``temperature`` 0, else a sample from
   ``softmax((logp_base + alpha · v) / temperature)`` over the candidates.

The answer's log-ratio to the base, summed over the decision steps, is reported with the steps.
"""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from pydantic import BaseModel, Field

from decoding.base import (
    Candidate,
    Generation,
    GenerationJob,
    Limits,
    PromptInput,
    base_prompt_text,
    cut_at_stop,
    generate_each,
)
from models.engine import Engine, FinishReason, SamplingParams
from models.errors import InvalidRequestError

MAX_REPORTED_STEPS = 32


class CandidateRecord(BaseModel):
    text: str
    token_ids: list[int]
    logprob: float = Field(description="The base's log-probability of the candidate.")
    q: float = Field(description="The method's value of it: Q̂ for Transfer-Q*, the ARM's log-probability for GenARM.")


class DecisionStep(BaseModel):
    candidates: list[CandidateRecord]
    chosen: int


class GuidedDetails(BaseModel):
    """What a token-guided decoding did, per answer."""

    decision_steps: int
    log_ratio: float = Field(
        description="Σ over decision steps of log π(z) - log π_base(z) for the chosen z, π being the decision "
        "rule's distribution over the step's candidates (a point mass at temperature 0): the answer's log-ratio, "
        "whose mean over answers estimates KL(π ‖ π_base). For sampled blocks it takes the k blocks as the support."
    )
    steps: list[DecisionStep] = Field(description=f"The first {MAX_REPORTED_STEPS} decision steps.")
    truncated: bool


@dataclass(slots=True)
class Proposal:
    """A candidate the base proposed: its token ids and their log-probability under the base."""

    token_ids: list[int]
    logprob: float


def decision_scores(logprobs: Sequence[float], values: Sequence[float], alpha: float) -> np.ndarray:
    return np.asarray(logprobs, dtype=np.float64) + alpha * np.asarray(values, dtype=np.float64)


def decision_probabilities(
    logprobs: Sequence[float], values: Sequence[float], alpha: float, temperature: float = 1.0
) -> np.ndarray:
    """``softmax((logp + alpha · v) / temperature)`` over the candidates."""
    scores = decision_scores(logprobs, values, alpha) / temperature
    weights = np.exp(scores - scores.max())
    return weights / weights.sum()


def choose(
    logprobs: Sequence[float], values: Sequence[float], alpha: float, temperature: float, rng: random.Random
) -> int:
    if temperature == 0:
        return int(np.argmax(decision_scores(logprobs, values, alpha)))  # ties: the lowest index
    probabilities = decision_probabilities(logprobs, values, alpha, temperature)
    return rng.choices(range(len(probabilities)), weights=probabilities.tolist())[0]


def decision_log_ratio(
    logprobs: Sequence[float], values: Sequence[float], alpha: float, temperature: float, chosen: int
) -> float:
    """log π(z) - log π_base(z) of the chosen candidate under the decision rule ``choose`` follows."""
    policy = 0.0 if temperature == 0 else math.log(decision_probabilities(logprobs, values, alpha, temperature)[chosen])
    return policy - logprobs[chosen]


class GuidedDecoding(ABC):
    """One answer decoded step by step; a method says how candidates are valued.

    Args:
        base: the model that proposes candidates.
        prompt_ids: the prompt as the base's token ids (the state starts here).
        max_tokens: the answer's budget.
        top_k: candidates per decision step.
        block_tokens: 1: the base's top-k next tokens; more: k sampled blocks of that many tokens.
        alpha: the value's weight; temperature: of the decision (0 = argmax).
        stop: stop strings: the answer ends before the first (its tokens up to there are kept, as an engine does).
        seed: seeds sampled choices and blocks; ``name`` keeps methods' random streams apart.
    """

    details_model: ClassVar[type[GuidedDetails]] = GuidedDetails

    def __init__(
        self,
        base: Engine,
        *,
        prompt_ids: list[int],
        max_tokens: int,
        top_k: int,
        block_tokens: int,
        alpha: float,
        temperature: float,
        stop: tuple[str, ...],
        seed: int | None,
        name: str,
    ) -> None:
        self.base = base
        self.stop = stop
        self.prompt_ids, self.max_tokens = prompt_ids, max_tokens
        self.top_k, self.block_tokens = top_k, block_tokens
        self.alpha, self.temperature = alpha, temperature
        self.seed = seed
        self.rng = random.Random(f"{name}/{seed}") if seed is not None else random.Random()

    @abstractmethod
    async def values(self, answer: list[int], candidates: list[Proposal]) -> list[float]:
        """``v(s, z)`` for each candidate ``z`` after the answer so far."""

    async def run(self) -> tuple[list[int], str, FinishReason, GuidedDetails]:
        answer: list[int] = []
        steps: list[DecisionStep] = []
        taken = 0
        log_ratio = 0.0
        finish: FinishReason = "length"
        while len(answer) < self.max_tokens:
            candidates, ended = await self._candidates(answer)
            values = await self.values(answer, candidates)
            logprobs = [c.logprob for c in candidates]
            chosen = choose(logprobs, values, self.alpha, self.temperature, self.rng)
            log_ratio += decision_log_ratio(logprobs, values, self.alpha, self.temperature, chosen)
            answer += candidates[chosen].token_ids[: self.max_tokens - len(answer)]
            taken += 1
            if taken <= MAX_REPORTED_STEPS:  # only these are reported: later steps are not decoded for details
                steps.append(self._record(candidates, values, chosen))
            # The answer is decoded to look for a stop string only where the request has one.
            if ended[chosen] or (self.stop and cut_at_stop(self.base.tokenizer.decode(answer), self.stop)[1]):
                finish = "stop"
                break
        details = self.details_model(
            decision_steps=taken, log_ratio=log_ratio, steps=steps, truncated=taken > MAX_REPORTED_STEPS
        )
        return answer, cut_at_stop(self.base.tokenizer.decode(answer), self.stop)[0], finish, details

    def derived_seed(self, salt: int) -> int | None:
        """A seed for one engine call of this answer (None when unseeded)."""
        return None if self.seed is None else self.seed * 1_000_003 + salt

    async def _candidates(self, answer: list[int]) -> tuple[list[Proposal], list[bool]]:
        """Top-k next tokens of the base, or k sampled blocks; and whether each one ends the answer."""
        state = self.prompt_ids + answer
        if self.block_tokens == 1:
            params = SamplingParams(max_tokens=1, temperature=0, logprobs=self.top_k)
            sample = (await self.base.generate(state, params)).samples[0]
            record = (sample.logprobs or [])[0]
            candidates = [Proposal([alt.token_id], alt.logprob) for alt in record.top or (record,)]
            eos = self.base.info.eos_token_ids
            return candidates, [c.token_ids[0] in eos for c in candidates]
        params = SamplingParams(
            max_tokens=self.block_tokens, temperature=1.0, n=self.top_k, logprobs=0,
            seed=self.derived_seed(2 * len(answer)),
        )  # fmt: skip
        samples = (await self.base.generate(state, params)).samples
        candidates = [Proposal(s.token_ids, sum(r.logprob for r in s.logprobs or [])) for s in samples]
        return candidates, [s.finish_reason == "stop" for s in samples]

    def _record(self, candidates: list[Proposal], values: list[float], chosen: int) -> DecisionStep:
        return DecisionStep(
            candidates=[
                CandidateRecord(
                    text=self.base.tokenizer.decode(c.token_ids), token_ids=c.token_ids, logprob=c.logprob, q=value
                )
                for c, value in zip(candidates, values, strict=True)
            ],
            chosen=chosen,
        )


class GuidedStrategy(ABC):
    """A token-guided method as a pipeline strategy: the base's prompt, the checks, ``n`` answers at once.

    Args:
        guide: the model the method pairs with the base (it reads the base's token ids).
        guide_param: where the request names it (``alignment.<method>.<field>``).
        role: what the guide is, in messages.
        lookahead: how many tokens past the answer the guide reads (rollouts).
    """

    method: ClassVar[str]
    """The method's name in ``alignment``."""

    def __init__(
        self, guide: Engine, *, guide_param: str, role: str, top_k: int, block_tokens: int, limits: Limits,
        lookahead: int = 0,
    ) -> None:  # fmt: skip
        self.guide, self.guide_param, self.role = guide, guide_param, role
        self.top_k, self.block_tokens, self.lookahead = top_k, block_tokens, lookahead
        self.limits = limits

    @abstractmethod
    def work_per_step(self) -> tuple[int, str]:
        """The work of one decision step, and its formula in words (for the error that refuses too much)."""

    @abstractmethod
    def decoding(self, job: GenerationJob, seed: int | None) -> GuidedDecoding:
        """One answer's decoding."""

    def render(self, base: Engine, prompt: PromptInput) -> str | None:
        self._check(base)
        return base_prompt_text(base, prompt)

    def _check(self, base: Engine) -> None:
        info = base.info
        if self.guide.info.tokenizer_id != info.tokenizer_id:
            raise InvalidRequestError(
                f"The {self.role} `{self.guide.info.name}` and the base `{info.name}` must share a tokenizer.",
                param=self.guide_param,
            )
        if self.block_tokens == 1 and self.top_k > info.max_logprobs:
            raise InvalidRequestError(
                f"`alignment.{self.method}.top_k` must be at most {info.max_logprobs} (the base's logprob limit), "
                f"got {self.top_k}.",
                param=f"alignment.{self.method}.top_k",
            )

    def check(self, job: GenerationJob) -> None:
        """The guide's context holds what it reads; the request's work (a step's work times the decision
        steps) is within the server's bound."""
        context = len(job.prompt_ids) + job.sampling.max_tokens + self.lookahead
        if context > self.guide.info.max_model_len:
            raise InvalidRequestError(
                f"The {self.role} `{self.guide.info.name}` would read {context} tokens (the prompt, max_tokens and "
                f"its lookahead); its context holds {self.guide.info.max_model_len}. Lower max_tokens.",
                param="max_tokens",
            )
        work, formula = self.work(job), self.work_per_step()[1]
        if work > self.limits.max_guided_work:
            raise InvalidRequestError(
                f"`{self.method}` would do {work} units of work ({formula} x decision steps); this server allows "
                f"{self.limits.max_guided_work}. Lower them or max_tokens.",
                param=f"alignment.{self.method}",
            )

    def work(self, job: GenerationJob) -> int:
        """A step's work times the decision steps."""
        return self.work_per_step()[0] * math.ceil(job.sampling.max_tokens / self.block_tokens)

    async def generate(self, job: GenerationJob, n: int) -> Generation:
        async def one(seed: int | None) -> Candidate:
            ids, text, finish, details = await self.decoding(job, seed).run()
            return Candidate(text, ids, finish, None, {self.method: details})

        return Generation(await generate_each(n, job.sampling.seed, one))
