"""GenARM (Xu et al. 2024, arXiv 2410.08193): reward-guided decoding with an autoregressive reward model.

An autoregressive reward model (ARM) is a causal LM trained so that ``beta_r · log π_r(y | x)`` is a reward
(the toy world's ``arm`` is trained so: ``toyworld.training.train_autoregressive_reward``). Its next-token
log-probabilities are then token-level rewards, and each token is drawn from

    softmax((logp_base + logp_ARM / beta) / temperature)

over the base's top-``k`` next tokens: GenARM's ``π_base · π_r^(1/beta)`` (at temperature 1), restricted to
where the base puts its mass, as the paper decodes it. It is a token-guided decoding
(``decoding.token_guidance``) whose value of a candidate ``z`` at state ``s`` is ``logp_ARM(z | s)``, with
``alpha = 1 / beta``. The ARM scores the ``k`` candidates in one batched call per step: the ``k`` prompts
``s + z``, whose last prompt logprob is ``logp_ARM(z | s)``. vLLM computes prompt logprobs outside its
prefix cache, so each step prefills the state ``k`` times there: the ARM is meant to be small.

The ARM reads the base's token ids, so it must share the base's tokenizer (checked).
"""

from __future__ import annotations

from pydantic import Field

from decoding.base import GenerationJob, Limits, MethodParams, Resources
from decoding.token_guidance import GuidedDecoding, GuidedDetails, GuidedStrategy, Proposal
from models.engine import Engine, SamplingParams


class GenArmParams(MethodParams):
    """``alignment.genarm``: each token reweighted by an autoregressive reward model (GenARM)."""

    shares_tokenizer = ("reward_model",)

    reward_model: str = Field(description="The autoregressive reward model: a served causal LM, the base's tokenizer.")
    beta: float = Field(default=1.0, gt=0, le=1000, description="The ARM's logits are weighted 1 / beta.")
    top_k: int = Field(default=10, ge=1, le=256, description="The base's candidates per token.")
    temperature: float = Field(
        default=1.0, ge=0, le=10, description="Of the decision: 1 samples GenARM's distribution; 0 = argmax."
    )


class GenArmDetails(GuidedDetails):
    """What GenARM did for one answer; each candidate's ``q`` is the ARM's log-probability of it."""


class GenArm(GuidedDecoding):
    """One GenARM generation: ``base`` proposes its top-k, ``arm`` (sharing its tokenizer) scores them."""

    details_model = GenArmDetails

    def __init__(
        self, base: Engine, arm: Engine, params: GenArmParams, *, prompt_ids: list[int], max_tokens: int,
        stop: tuple[str, ...] = (), seed: int | None = None,
    ) -> None:  # fmt: skip
        super().__init__(
            base, prompt_ids=prompt_ids, max_tokens=max_tokens, top_k=params.top_k, block_tokens=1,
            alpha=1 / params.beta, temperature=params.temperature, stop=stop, seed=seed, name="genarm",
        )  # fmt: skip
        self.arm = arm

    async def values(self, answer: list[int], candidates: list[Proposal]) -> list[float]:
        """``logp_ARM(z | s)`` of each candidate: the last prompt logprob of ``s + z``, all in one call."""
        state = self.prompt_ids + answer
        scoring = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
        completions = await self.arm.generate_batch([state + c.token_ids for c in candidates], scoring)
        values = []
        for completion in completions:
            last = (completion.prompt_logprobs or [None])[-1]
            assert last is not None, "a state of two or more tokens has a logprob at its last position"
            values.append(last.logprob)
        return values


class GenArmStrategy(GuidedStrategy):
    """GenARM as a pipeline strategy; ``n`` answers run concurrently."""

    method = "genarm"

    def __init__(self, params: GenArmParams, resources: Resources, limits: Limits) -> None:
        arm = resources.engine(params.reward_model, param="alignment.genarm.reward_model")
        super().__init__(arm, guide_param="alignment.genarm.reward_model", role="reward model",
                         top_k=params.top_k, block_tokens=1, limits=limits)  # fmt: skip
        self.params = params

    def work_per_step(self) -> tuple[int, str]:
        return self.params.top_k, "top_k"

    def decoding(self, job: GenerationJob, seed: int | None) -> GenArm:
        return GenArm(job.engine, self.guide, self.params, prompt_ids=job.prompt_ids,
                      max_tokens=job.sampling.max_tokens, stop=job.sampling.stop, seed=seed)  # fmt: skip
