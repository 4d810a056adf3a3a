"""Transfer-Q* (Chakraborty et al. 2024): token-level decoding toward ``pi_base · exp(alpha · Q*)``.

A token-guided decoding (``decoding.token_guidance``) whose value of a candidate ``z`` at state ``s`` is
``Q̂(s, z)``: ``rollouts`` continuations of ``rollout_tokens`` tokens from the baseline aligned model on
``s + z`` for every candidate (one batched engine call), scored by the reward (one batched call).
``direct`` transfer: the mean reward; ``indirect`` (a baseline aligned to another reward r_BL):
self-normalised weights ``w ∝ exp((r - r_BL) / beta)`` over the rollouts. ``rollout_tokens = 0`` is ARGS:
the reward of the partial text.

Rollouts are greedy when ``rollouts == 1`` and sampled (temperature 1) otherwise.
Base and baseline must share a tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field, model_validator

from decoding.base import GenerationJob, Limits, MethodParams, Resources
from decoding.token_guidance import GuidedDecoding, GuidedDetails, GuidedStrategy, Proposal
from models.engine import Engine, SamplingParams
from models.scorers import Scorer

if TYPE_CHECKING:
    from typing import Self


class TransferQParams(MethodParams):
    """``alignment.transfer_q``: each token chosen by its Q value from baseline rollouts (Transfer-Q*)."""

    shares_tokenizer = ("baseline",)

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


class TransferQDetails(GuidedDetails):
    """What Transfer-Q* did for one answer; each candidate's ``q`` is its Q̂."""


def self_normalised_q(rewards: Sequence[float], baseline_rewards: Sequence[float], beta: float) -> float:
    """Indirect transfer: ``Σ w_i r_i`` with ``w ∝ exp((r - r_BL) / beta)``, normalised over the rollouts."""
    log_weights = (np.asarray(rewards) - np.asarray(baseline_rewards)) / beta
    weights = np.exp(log_weights - log_weights.max())
    return float(np.dot(weights / weights.sum(), rewards))


class TransferQ(GuidedDecoding):
    """One Transfer-Q* generation.

    Args:
        base, baseline: engines sharing a tokenizer.
        reward: the target reward; ``baseline_reward`` for indirect transfer.
        params: the method's parameters.
        prompt_ids: the prompt as token ids (the state starts here).
        prompt_text: the prompt as the reward model sees it.
        max_tokens: the answer's budget; stop: stop strings.
        seed: seeds sampled choices, blocks and rollouts.
    """

    details_model = TransferQDetails

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
        stop: tuple[str, ...] = (),
        seed: int | None = None,
    ) -> None:
        super().__init__(
            base, prompt_ids=prompt_ids, max_tokens=max_tokens, top_k=params.top_k, block_tokens=params.block_tokens,
            alpha=params.alpha, temperature=params.temperature, stop=stop, seed=seed, name="transfer_q",
        )  # fmt: skip
        self.baseline = baseline
        self.reward, self.baseline_reward = reward, baseline_reward
        self.params = params
        self.prompt_text = prompt_text

    async def values(self, answer: list[int], candidates: list[Proposal]) -> list[float]:
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
            seed=self.derived_seed(2 * len(prefixes[0]) + 1),
        )
        completions = await self.baseline.generate_batch([self.prompt_ids + p for p in prefixes], params)
        return [
            [self.base.tokenizer.decode(prefix + sample.token_ids) for sample in completion.samples]
            for prefix, completion in zip(prefixes, completions, strict=True)
        ]


class TransferQStrategy(GuidedStrategy):
    """Transfer-Q* as a pipeline strategy; ``n`` answers run concurrently."""

    method = "transfer_q"

    def __init__(self, params: TransferQParams, resources: Resources, limits: Limits) -> None:
        baseline = resources.engine(params.baseline, param="alignment.transfer_q.baseline")
        super().__init__(baseline, guide_param="alignment.transfer_q.baseline", role="baseline", top_k=params.top_k,
                         block_tokens=params.block_tokens, limits=limits, lookahead=params.rollout_tokens)  # fmt: skip
        self.params = params
        self.reward = resources.scorer(params.reward, param="alignment.transfer_q.reward")
        self.baseline_reward = (
            resources.scorer(params.baseline_reward, param="alignment.transfer_q.baseline_reward")
            if params.baseline_reward is not None
            else None
        )

    def work_per_step(self) -> tuple[int, str]:
        params = self.params
        return params.top_k * params.rollouts * (params.rollout_tokens + 1), "top_k x rollouts x (rollout_tokens + 1)"

    def decoding(self, job: GenerationJob, seed: int | None) -> TransferQ:
        return TransferQ(
            job.engine, self.guide, self.reward, self.params, prompt_ids=job.prompt_ids, prompt_text=job.prompt_text,
            max_tokens=job.sampling.max_tokens, baseline_reward=self.baseline_reward, stop=job.sampling.stop, seed=seed,
        )  # fmt: skip
