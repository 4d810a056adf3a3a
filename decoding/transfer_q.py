"""Transfer-Q* (Chakraborty et al. 2024): token-level decoding toward ``pi_base · exp(alpha · Q*)``.

At each decision step, from the state ``s`` (prompt + answer so far, token ids
shared by base and baseline):

1. candidates: the base's top-``k`` next tokens (``block_tokens = 1``), or ``k``
   blocks of ``block_tokens`` sampled from the base (blockwise controlled decoding);
2. ``Q̂(s, z)``: ``rollouts`` continuations of ``rollout_tokens`` tokens from the
   baseline aligned model on ``s + z`` for every candidate (one batched engine call),
   scored by the reward (one batched call). ``direct`` transfer: the mean reward;
   ``indirect`` (a baseline aligned to another reward r_BL): self-normalised weights
   ``w ∝ exp((r - r_BL) / beta)`` over the rollouts. ``rollout_tokens = 0`` is ARGS:
   the reward of the partial text;
3. the choice: ``argmax(logp_base(z) + alpha · Q̂(z))`` at ``temperature`` 0, else a
   sample from ``softmax((logp_base + alpha · Q̂) / temperature)`` over the candidates.

Rollouts are greedy when ``rollouts == 1`` and sampled (temperature 1) otherwise.
Base and baseline must share a tokenizer.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import BaseModel, Field, model_validator

from decoding.base import (
    Candidate,
    Generation,
    GenerationJob,
    Limits,
    MethodParams,
    PromptInput,
    Resources,
    base_prompt_text,
    generate_each,
)
from models.engine import Engine, FinishReason, SamplingParams
from models.errors import InvalidRequestError
from models.scorers import Scorer

if TYPE_CHECKING:
    from typing import Self

MAX_REPORTED_STEPS = 32


class TransferQParams(MethodParams):
    """``alignment.transfer_q``."""

    baseline: str = Field(description="The baseline aligned model; must share the base's tokenizer.")
    reward: str = Field(description="The target reward scorer.")
    alpha: float = Field(default=1.0, ge=0, le=1000)
    top_k: int = Field(default=10, ge=1, le=256)
    rollout_tokens: int = Field(default=20, ge=0, le=1024, description="0 is ARGS: the reward of the partial text.")
    rollouts: int = Field(default=1, ge=1, le=64)
    block_tokens: int = Field(default=1, ge=1, le=1024, description="> 1: candidates are sampled blocks.")
    mode: Literal["direct", "indirect"] = "direct"
    baseline_reward: str | None = Field(default=None, description="indirect: the reward the baseline is aligned to.")
    beta: float = Field(default=1.0, gt=0, description="indirect: the importance-weight temperature.")
    temperature: float = Field(default=0.0, ge=0, le=10, description="0 = argmax.")

    @model_validator(mode="after")
    def _indirect_needs_its_reward(self) -> Self:
        if self.mode == "indirect" and self.baseline_reward is None:
            raise ValueError("indirect transfer needs `baseline_reward`")
        return self


class CandidateRecord(BaseModel):
    text: str
    token_ids: list[int]
    logprob: float
    q: float


class DecisionStep(BaseModel):
    candidates: list[CandidateRecord]
    chosen: int


class TransferQDetails(BaseModel):
    decision_steps: int
    log_ratio: float = Field(
        description="Σ over decision steps of log π(z) - log π_base(z) for the chosen z, π being the decision "
        "rule's distribution over the step's candidates (a point mass at temperature 0): the answer's log-ratio, "
        "whose mean over answers estimates KL(π ‖ π_base). For sampled blocks it takes the k blocks as the support."
    )
    steps: list[DecisionStep] = Field(description=f"The first {MAX_REPORTED_STEPS} decision steps.")
    truncated: bool


@dataclass(slots=True)
class _Candidate:
    token_ids: list[int]
    logprob: float


def decision_scores(logprobs: Sequence[float], q: Sequence[float], alpha: float) -> np.ndarray:
    return np.asarray(logprobs, dtype=np.float64) + alpha * np.asarray(q, dtype=np.float64)


def decision_probabilities(
    logprobs: Sequence[float], q: Sequence[float], alpha: float, temperature: float = 1.0
) -> np.ndarray:
    """``softmax((logp + alpha · Q) / temperature)`` over the candidates."""
    scores = decision_scores(logprobs, q, alpha) / temperature
    weights = np.exp(scores - scores.max())
    return weights / weights.sum()


def choose(logprobs: Sequence[float], q: Sequence[float], alpha: float, temperature: float, rng: random.Random) -> int:
    if temperature == 0:
        return int(np.argmax(decision_scores(logprobs, q, alpha)))  # ties: the lowest index
    probabilities = decision_probabilities(logprobs, q, alpha, temperature)
    return rng.choices(range(len(probabilities)), weights=probabilities.tolist())[0]


def decision_log_ratio(
    logprobs: Sequence[float], q: Sequence[float], alpha: float, temperature: float, chosen: int
) -> float:
    """log π(z) - log π_base(z) of the chosen candidate under the decision rule ``choose`` follows."""
    policy = 0.0 if temperature == 0 else math.log(decision_probabilities(logprobs, q, alpha, temperature)[chosen])
    return policy - logprobs[chosen]


def self_normalised_q(rewards: Sequence[float], baseline_rewards: Sequence[float], beta: float) -> float:
    """Indirect transfer: ``Σ w_i r_i`` with ``w ∝ exp((r - r_BL) / beta)``, normalised over the rollouts."""
    log_weights = (np.asarray(rewards) - np.asarray(baseline_rewards)) / beta
    weights = np.exp(log_weights - log_weights.max())
    return float(np.dot(weights / weights.sum(), rewards))


class TransferQ:
    """One Transfer-Q* generation.

    Args:
        base, baseline: engines sharing a tokenizer.
        reward: the target reward; ``baseline_reward`` for indirect transfer.
        params: the method's parameters.
        prompt_ids: the prompt as token ids (the state starts here).
        prompt_text: the prompt as the reward model sees it.
        max_tokens: the answer's budget.
        seed: seeds sampled choices and blocks.
    """

    def __init__(
        self,
        base: Engine,
        baseline: Engine,
        reward: Scorer,
        params: TransferQParams,
        *,
        prompt_ids: list[int],
        prompt_text: str,
        max_tokens: int,
        baseline_reward: Scorer | None = None,
        seed: int | None = None,
    ) -> None:
        self.base, self.baseline = base, baseline
        self.reward, self.baseline_reward = reward, baseline_reward
        self.params = params
        self.prompt_ids, self.prompt_text = prompt_ids, prompt_text
        self.max_tokens = max_tokens
        self.seed = seed
        self.rng = random.Random(f"transfer_q/{seed}") if seed is not None else random.Random()

    async def run(self) -> tuple[list[int], str, FinishReason, TransferQDetails]:
        answer: list[int] = []
        steps: list[DecisionStep] = []
        log_ratio = 0.0
        finish: FinishReason = "length"
        alpha, temperature = self.params.alpha, self.params.temperature
        while len(answer) < self.max_tokens:
            candidates, ended = await self._candidates(answer)
            q = await self._q_values(answer, candidates)
            logprobs = [c.logprob for c in candidates]
            chosen = choose(logprobs, q, alpha, temperature, self.rng)
            log_ratio += decision_log_ratio(logprobs, q, alpha, temperature, chosen)
            block = candidates[chosen].token_ids[: self.max_tokens - len(answer)]
            answer += block
            steps.append(self._record(candidates, q, chosen))
            if ended[chosen]:
                finish = "stop"
                break
        details = TransferQDetails(
            decision_steps=len(steps), log_ratio=log_ratio, steps=steps[:MAX_REPORTED_STEPS],
            truncated=len(steps) > MAX_REPORTED_STEPS,
        )  # fmt: skip
        return answer, self.base.tokenizer.decode(answer), finish, details

    def _seed(self, salt: int) -> int | None:
        return None if self.seed is None else self.seed * 1_000_003 + salt

    async def _candidates(self, answer: list[int]) -> tuple[list[_Candidate], list[bool]]:
        """Top-k next tokens of the base, or k sampled blocks; and whether each one ends the answer."""
        state = self.prompt_ids + answer
        if self.params.block_tokens == 1:
            params = SamplingParams(max_tokens=1, temperature=0, logprobs=self.params.top_k)
            sample = (await self.base.generate(state, params)).samples[0]
            record = (sample.logprobs or [])[0]
            candidates = [_Candidate([alt.token_id], alt.logprob) for alt in record.top or (record,)]
            eos = self.base.info.eos_token_ids
            return candidates, [c.token_ids[0] in eos for c in candidates]
        params = SamplingParams(
            max_tokens=self.params.block_tokens, temperature=1.0, n=self.params.top_k, logprobs=0,
            seed=self._seed(2 * len(answer)),
        )  # fmt: skip
        samples = (await self.base.generate(state, params)).samples
        candidates = [_Candidate(s.token_ids, sum(r.logprob for r in s.logprobs or [])) for s in samples]
        return candidates, [s.finish_reason == "stop" for s in samples]

    async def _q_values(self, answer: list[int], candidates: list[_Candidate]) -> list[float]:
        prefixes = [answer + c.token_ids for c in candidates]
        if self.params.rollout_tokens == 0:
            texts = [[self.base.tokenizer.decode(prefix)] for prefix in prefixes]
        else:
            texts = await self._rollouts(prefixes)
        flat = [text for group in texts for text in group]
        pairs = [(self.prompt_text, text) for text in flat]
        rewards = await self.reward.score(pairs)
        baseline_rewards = await self.baseline_reward.score(pairs) if self.baseline_reward is not None else None
        q, position = [], 0
        for group in texts:
            chunk = rewards[position : position + len(group)]
            if baseline_rewards is None:
                q.append(float(np.mean(chunk)))
            else:
                q.append(self_normalised_q(chunk, baseline_rewards[position : position + len(group)], self.params.beta))
            position += len(group)
        return q

    async def _rollouts(self, prefixes: list[list[int]]) -> list[list[str]]:
        """All candidates' rollouts in one batched baseline call."""
        params = SamplingParams(
            max_tokens=self.params.rollout_tokens,
            temperature=0.0 if self.params.rollouts == 1 else 1.0,
            n=self.params.rollouts,
            seed=self._seed(2 * len(prefixes[0]) + 1),
        )
        completions = await self.baseline.generate_batch([self.prompt_ids + p for p in prefixes], params)
        return [
            [self.base.tokenizer.decode(prefix + sample.token_ids) for sample in completion.samples]
            for prefix, completion in zip(prefixes, completions, strict=True)
        ]

    def _record(self, candidates: list[_Candidate], q: list[float], chosen: int) -> DecisionStep:
        return DecisionStep(
            candidates=[
                CandidateRecord(
                    text=self.base.tokenizer.decode(c.token_ids), token_ids=c.token_ids, logprob=c.logprob, q=value
                )
                for c, value in zip(candidates, q, strict=True)
            ],
            chosen=chosen,
        )


class TransferQStrategy:
    """Transfer-Q* as a pipeline strategy; ``n`` answers run concurrently."""

    def __init__(self, params: TransferQParams, resources: Resources, limits: Limits) -> None:
        self.params = params
        self.baseline = resources.engine(params.baseline, param="alignment.transfer_q.baseline")
        self.reward = resources.scorer(params.reward, param="alignment.transfer_q.reward")
        self.baseline_reward = (
            resources.scorer(params.baseline_reward, param="alignment.transfer_q.baseline_reward")
            if params.baseline_reward is not None
            else None
        )
        self.limits = limits

    def render(self, base: Engine, prompt: PromptInput) -> str | None:
        self._check(base)
        return base_prompt_text(base, prompt)

    def _check(self, base: Engine) -> None:
        params, info = self.params, base.info
        if self.baseline.info.tokenizer_id != info.tokenizer_id:
            raise InvalidRequestError(
                f"The baseline `{params.baseline}` and the base `{info.name}` must share a tokenizer.",
                param="alignment.transfer_q.baseline",
            )
        if params.block_tokens == 1 and params.top_k > info.max_logprobs:
            raise InvalidRequestError(
                f"`alignment.transfer_q.top_k` must be at most {info.max_logprobs} (the base's logprob limit), "
                f"got {params.top_k}.",
                param="alignment.transfer_q.top_k",
            )

    def check(self, job: GenerationJob) -> None:
        """The request's work, ``top_k x rollouts x (rollout_tokens + 1) x steps``, within the server's bound."""
        params = self.params
        steps = math.ceil(job.sampling.max_tokens / params.block_tokens)
        work = params.top_k * params.rollouts * (params.rollout_tokens + 1) * steps
        if work > self.limits.max_transfer_q_work:
            raise InvalidRequestError(
                f"Transfer-Q* would do {work} units of work (top_k x rollouts x (rollout_tokens + 1) x steps); "
                f"this server allows {self.limits.max_transfer_q_work}. Lower top_k, rollouts, rollout_tokens "
                "or max_tokens.",
                param="alignment.transfer_q",
            )

    async def generate(self, job: GenerationJob, n: int) -> Generation:
        async def one(seed: int | None) -> Candidate:
            decoding = TransferQ(
                job.engine,
                self.baseline,
                self.reward,
                self.params,
                prompt_ids=job.prompt_ids,
                prompt_text=job.prompt_text,
                max_tokens=job.sampling.max_tokens,
                baseline_reward=self.baseline_reward,
                seed=seed,
            )
            ids, text, finish, details = await decoding.run()
            return Candidate(text, ids, finish, None, {"transfer_q": details})

        return Generation(await generate_each(n, job.sampling.seed, one))
