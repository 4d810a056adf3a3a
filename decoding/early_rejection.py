"""Best-of-N with early rejection (Speculative Rejection, Sun et al. 2024, arXiv 2410.20290).

Best-of-N pays for N whole answers; most are visibly worse long before they end. Here the N
candidates are generated in rounds: the first round samples ``first_checkpoint`` tokens of each
(one engine call with ``n = N``), then after each round the reward model scores the partial texts
(one batched call), the worst ``rejection_rate`` of the candidates still running are dropped, and
the survivors continue from their own token ids (concurrent calls, each seeded apart; vLLM's
prefix cache holds their prefixes) to the next checkpoint, twice as far. After ``rounds``
rejections the survivors run to the end and the best finished candidate by reward is returned
(ties: the lowest index).

A candidate that ends early is never rejected (it costs nothing more) and competes at the end with
its final reward; a reward model judges a whole answer more surely than a partial one. With
``rejection_rate`` 0 nothing is ever rejected, so the candidates are drawn in one call, exactly as
``best_of_n`` draws them: the same seed gives the same answer.

The base generates the candidates itself (the plain strategy's samples): the method composes with
the prompt stage and the gate, not with another strategy or with grammar (a continuation would
restart the grammar's state).
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, replace

from pydantic import BaseModel, Field

from decoding.base import Candidate, GenerationJob, Limits, MethodParams, Resources
from decoding.best_of_n import aggregate, resolve_scorers, score_candidates
from models.engine import FinishReason, SamplingParams
from models.errors import InvalidRequestError
from models.scorers import Scorer


class EarlyRejectionParams(MethodParams):
    """``alignment.early_rejection``: best-of-N that drops low-reward partial candidates early."""

    n: int = Field(default=16, ge=1, le=64, description="Candidates started (also bounded by the server's limits).")
    reward: str | list[str] = Field(description="A scorer name, or several (their mean) for an ensemble.")
    first_checkpoint: int = Field(default=8, ge=1, le=4096, description="Tokens before the first rejection.")
    rejection_rate: float = Field(
        default=0.5, ge=0, lt=1, description="The share of running candidates dropped at each checkpoint."
    )
    rounds: int = Field(default=2, ge=1, le=8, description="Rejections; checkpoint j is at first_checkpoint x 2^j.")

    @property
    def rewards(self) -> list[str]:
        return [self.reward] if isinstance(self.reward, str) else list(self.reward)


class Checkpoint(BaseModel):
    tokens: int = Field(description="Where the round ended: each running candidate's tokens so far.")
    running: int = Field(description="Candidates still generating when it was scored.")
    kept: list[int] = Field(description="The running candidates (by index) that went on.")


class EarlyRejectionDetails(BaseModel):
    n: int
    chosen: int
    reward: float
    checkpoints: list[Checkpoint]
    generated_tokens: int = Field(description="Tokens generated for all candidates (best-of-N: about N x length).")


@dataclass(slots=True)
class _Partial:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    reward: float = -math.inf
    scored_tokens: int = -1


REWARD_PARAM = "alignment.early_rejection.reward"


def survivors(running: int, rate: float) -> int:
    """How many of ``running`` candidates a checkpoint keeps: at least one."""
    return max(1, math.ceil(running * (1 - rate)))


class EarlyRejectionSelection:
    """Early-rejection best-of-N as the pipeline's selection stage; it draws its own candidates from the base."""

    def check(
        self, params: EarlyRejectionParams, sampling: SamplingParams, resources: Resources, limits: Limits
    ) -> None:
        if params.n > limits.max_best_of_n:
            raise InvalidRequestError(
                f"`alignment.early_rejection.n` must be at most {limits.max_best_of_n}, got {params.n}.",
                param="alignment.early_rejection.n",
            )
        if sampling.n != 1:
            raise InvalidRequestError("`early_rejection` returns one answer: `n` must be 1.", param="n")
        resolve_scorers(params.rewards, resources, param=REWARD_PARAM)

    def samples(self, params: EarlyRejectionParams) -> int:
        return 0

    def base_samples(self, params: EarlyRejectionParams) -> int:
        return params.n

    async def select(
        self, params: EarlyRejectionParams, candidates: list[Candidate], job: GenerationJob, resources: Resources
    ) -> list[Candidate]:
        scorers = resolve_scorers(params.rewards, resources, param=REWARD_PARAM)
        budget = job.sampling.max_tokens
        first = budget if params.rejection_rate == 0 else min(params.first_checkpoint, budget)
        sampling = replace(job.sampling, n=params.n, max_tokens=first, logprobs=None, prompt_logprobs=None)
        samples = (await job.engine.generate(job.prompt_ids, sampling)).samples
        partials = [_Partial(s.index, s.text, s.token_ids, _finished(s.finish_reason, first, budget)) for s in samples]
        running: list[_Partial] = list(partials)
        checkpoints: list[Checkpoint] = []
        reach = first
        for round_ in range(params.rounds):
            await self._score(scorers, job, running)
            if all(p.finish_reason is not None for p in running):
                break
            done = [p for p in running if p.finish_reason is not None]
            ranked = sorted((p for p in running if p.finish_reason is None), key=lambda p: (-p.reward, p.index))
            kept = sorted(ranked[: survivors(len(ranked), params.rejection_rate)], key=lambda p: p.index)
            running = sorted(done + kept, key=lambda p: p.index)
            checkpoints.append(Checkpoint(tokens=reach, running=len(ranked), kept=[p.index for p in kept]))
            last = round_ == params.rounds - 1
            reach = budget if last else min(budget, params.first_checkpoint * 2 ** (round_ + 1))
            await self._extend(job, [p for p in running if p.finish_reason is None], reach, round_)
        await self._score(scorers, job, running)
        best = max(running, key=lambda p: (p.reward, -p.index))
        details = EarlyRejectionDetails(
            n=params.n, chosen=best.index, reward=best.reward, checkpoints=checkpoints,
            generated_tokens=sum(len(p.token_ids) for p in partials),
        )  # fmt: skip
        assert best.finish_reason is not None
        return [Candidate(best.text, best.token_ids, best.finish_reason, None, {"early_rejection": details})]

    @staticmethod
    async def _score(scorers: list[Scorer], job: GenerationJob, partials: list[_Partial]) -> None:
        """Scores, in one batched call per scorer, the candidates that grew since they were last scored."""
        fresh = [p for p in partials if p.scored_tokens != len(p.token_ids)]
        if not fresh:
            return
        rewards = aggregate(await score_candidates(scorers, job.prompt_text, [p.text for p in fresh]), "mean", 0)
        for partial, reward in zip(fresh, rewards, strict=True):
            partial.reward, partial.scored_tokens = reward, len(partial.token_ids)

    @staticmethod
    async def _extend(job: GenerationJob, partials: list[_Partial], reach: int, round_: int) -> None:
        """The unfinished survivors continue from their own token ids to ``reach`` tokens, concurrently, each
        seeded by its round and index (one batched call with one seed would give them all the same draws)."""

        async def extend(partial: _Partial) -> None:
            seed = None if job.sampling.seed is None else job.sampling.seed + (round_ + 1) * 1_000 + partial.index
            sampling = replace(job.sampling, n=1, max_tokens=reach - len(partial.token_ids), seed=seed,
                               logprobs=None, prompt_logprobs=None)  # fmt: skip
            sample = (await job.engine.generate(job.prompt_ids + partial.token_ids, sampling)).samples[0]
            partial.text += sample.text
            partial.token_ids = partial.token_ids + sample.token_ids
            partial.finish_reason = _finished(sample.finish_reason, reach, job.sampling.max_tokens)

        await asyncio.gather(*(extend(partial) for partial in partials))


def _finished(reason: FinishReason, reach: int, budget: int) -> FinishReason | None:
    """A round's finish reason as the candidate's: ``length`` short of the budget only pauses it."""
    if reason == "stop" or reach >= budget:
        return reason
    return None
