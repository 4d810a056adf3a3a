"""``POST /v1/rewards``: the server's scorers (and a model's log-likelihood) on (prompt, response) pairs.

It scores exactly as the methods do: a chat is rendered by the named model the way a multi-model method on
it renders it, and every scorer sees ``(prompt text, response)`` in one batched call. ``alignd eval`` uses it
for the reward of each answer and, with ``loglikelihood``, for the base model's log-likelihood of answers.
"""

from __future__ import annotations

import asyncio

from decoding.base import Limits, Resources, base_prompt_text, prompt_token_ids
from decoding.usage import MeteredEngine, MeteredResources, UsageMeter
from models.engine import Engine, SamplingParams
from models.errors import ContextLengthExceededError, InvalidRequestError
from server.admission import AdmissionTicket
from server.auth import check_model
from server.config import ApiKeyConfig
from server.engines import ModelRegistry
from server.protocol import Reward, RewardInput, RewardList, RewardRequest

# The log-likelihood comes from the prompt's logprobs; the one sampled token is not used.
_SCORE_ONLY = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)


class RewardsHandler:
    def __init__(self, registry: ModelRegistry, limits: Limits) -> None:
        self.registry = registry
        self.limits = limits

    async def create(
        self, request: RewardRequest, ticket: AdmissionTicket, key: ApiKeyConfig | None, meter: UsageMeter
    ) -> RewardList:
        """Scores ``request``, counting its scorer and engine calls into ``meter``; with an API key that may use
        some models only, the scorers and the model must be among them (others are refused as unknown ones are)."""
        if len(request.input) > self.limits.max_reward_inputs:
            raise InvalidRequestError(
                f"`input` holds {len(request.input)} pairs; at most {self.limits.max_reward_inputs} are scored "
                "per request.",
                param="input",
            )
        resources: Resources = self.registry
        if key is not None and key.models is not None:
            if request.model is not None:
                check_model(key, request.model)
            resources = self.registry.usable_by(key.models, request.model or "")
        metered = MeteredResources(resources, meter)
        scorers = [metered.scorer(name, param="scorers") for name in request.scorers]
        engine = MeteredEngine(self.registry.resolve(request.model)[0], meter) if request.model is not None else None
        prompts = [self._prompt_text(engine, item, index) for index, item in enumerate(request.input)]
        likelihoods: list[tuple[float, int]] | None = None
        if engine is not None:
            await ticket.admit(engine.info.name)
            if request.loglikelihood:
                likelihoods = await self._loglikelihoods(engine, request.input, prompts)
        pairs = [(prompt, item.response) for prompt, item in zip(prompts, request.input, strict=True)]
        empty = next((index for index, (prompt, response) in enumerate(pairs) if not prompt and not response), None)
        if empty is not None:
            raise InvalidRequestError(f"`input.{empty}` is empty: no prompt and no response to score.",
                                      param=f"input.{empty}")  # fmt: skip
        scores = await asyncio.gather(*(scorer.score(pairs) for scorer in scorers))
        return RewardList(
            model=request.model,
            data=[
                Reward(
                    index=i,
                    rewards={scorer.name: values[i] for scorer, values in zip(scorers, scores, strict=True)},
                    loglikelihood=likelihoods[i][0] if likelihoods else None,
                    response_tokens=likelihoods[i][1] if likelihoods else None,
                )
                for i in range(len(pairs))
            ],
        )

    @staticmethod
    def _prompt_text(engine: Engine | None, item: RewardInput, index: int) -> str:
        prompt = item.prompt_input()
        if engine is None:
            assert prompt.text is not None  # the request's validator asks for `model` with messages
            return prompt.text
        try:
            text = base_prompt_text(engine, prompt)
        except InvalidRequestError as exc:
            raise InvalidRequestError(exc.message, param=f"input.{index}.messages") from exc
        assert text is not None
        return text

    async def _loglikelihoods(
        self, engine: Engine, items: list[RewardInput], prompts: list[str]
    ) -> list[tuple[float, int]]:
        """Per pair: log p(response | prompt) summed over the response's tokens, and their number.

        The prompt is tokenised as the pipeline tokenises it and the response as its continuation, so the
        response's tokens are exactly its own (no merge across the boundary)."""
        sequences = []
        for index, (item, prompt) in enumerate(zip(items, prompts, strict=True)):
            prompt_ids = prompt_token_ids(engine, item.prompt_input(), prompt)
            response_ids = engine.tokenizer.encode_continuation(item.response)
            if len(prompt_ids) + len(response_ids) >= engine.info.max_model_len:
                raise ContextLengthExceededError(
                    f"`input.{index}` has {len(prompt_ids) + len(response_ids)} tokens; the model `{engine.info.name}`"
                    f" takes at most {engine.info.max_model_len - 1} to score one.",
                    param=f"input.{index}",
                )
            sequences.append((prompt_ids, response_ids))
        completions = await engine.generate_batch([p + r for p, r in sequences], _SCORE_ONLY)
        results = []
        for (prompt_ids, response_ids), completion in zip(sequences, completions, strict=True):
            logprobs = (completion.prompt_logprobs or [])[len(prompt_ids) :]
            total = sum(record.logprob for record in logprobs if record is not None)
            results.append((total, len(response_ids)))
        return results
