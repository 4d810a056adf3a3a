"""The decoding pipeline: prompt stage -> generation strategy -> selection stage.

1. Prompt stage: guideline retrieval rewrites the messages or prompt (once per request).
2. Generation strategy: plain (one engine), or one registered in ``decoding.registry``
   (multi-model strategies). Logits processors run inside whichever engine generates.
3. Selection stage: best-of-N draws N candidates from the strategy (plain: one engine
   call with ``n = N``), scores them in one batched call per scorer and returns the top
   ``n`` in selection order.

Every engine call is metered, so ``usage`` counts all tokens the request cost.
"""

from __future__ import annotations

import random
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import Any

from pydantic import BaseModel

from decoding import best_of_n
from decoding.alignment import Alignment
from decoding.base import (
    Candidate,
    Limits,
    MeteredEngine,
    MeteredResources,
    Prepared,
    PromptInput,
    Resources,
    Strategy,
    UsageMeter,
)
from decoding.grammar import GrammarConstraint, GrammarService
from decoding.guidelines import GuidelineRetriever
from decoding.plain import PlainStrategy
from decoding.registry import METHODS
from models.engine import Engine, SampleDelta, SamplingParams
from models.errors import ContextLengthExceededError, InvalidRequestError, WorkBudgetExceededError


@dataclass(slots=True)
class AlignedRequest:
    """What the server hands over: a resolved base engine, the client's prompt and sampling, the alignment."""

    engine: Engine
    prompt: PromptInput
    sampling: SamplingParams
    alignment: Alignment
    requested_max_tokens: int | None = None
    budget_param: str = "max_tokens"


@dataclass(slots=True)
class PipelineResult:
    prompt_ids: list[int]
    choices: list[Candidate]
    meter: UsageMeter


class Pipeline:
    """Runs aligned requests. Built once per server with its resources injected.

    Args:
        resources: engines and scorers by name.
        retriever: the guideline libraries.
        limits: server bounds on what a request may ask.
    """

    def __init__(
        self,
        resources: Resources,
        retriever: GuidelineRetriever,
        limits: Limits,
        grammars: GrammarService | None = None,
    ) -> None:
        self.resources = resources
        self.retriever = retriever
        self.limits = limits
        self.grammars = grammars or GrammarService()

    async def prepare(self, request: AlignedRequest) -> Prepared:
        alignment = request.alignment
        meter = UsageMeter(models={request.engine.info.name})
        resources = MeteredResources(self.resources, meter)
        self._check_selection(request, resources)
        details: dict[str, BaseModel] = {}
        prompt = request.prompt
        if alignment.guidelines is not None:
            prompt, details["guidelines"] = self.retriever.apply(prompt, alignment.guidelines)
        engine = MeteredEngine(request.engine, meter)
        strategy = self._strategy(request, resources)
        rendered = await strategy.render(engine, prompt)
        prompt_ids = await _prompt_ids(engine, prompt, rendered)
        max_tokens = self._max_tokens(engine, len(prompt_ids), request)
        sampling = replace(request.sampling, max_tokens=max_tokens)
        constraint = self._grammar(request, prompt_ids, sampling)
        if constraint is not None:
            sampling = constraint.apply(sampling)
        prepared = Prepared(
            request, engine, strategy, prompt, prompt_ids, sampling, meter, rendered, details, constraint
        )
        self._check_work(prepared)
        return prepared

    def _check_work(self, prepared: Prepared) -> None:
        """Refuses, before any generation, a request that asks for more compute than the server allows."""
        limit = self.limits.max_request_work
        if prepared.work <= limit:
            return
        name = prepared.request.budget_param
        raise WorkBudgetExceededError(
            f"This request asks for {prepared.samples} samples x {prepared.sampling.max_tokens} tokens x "
            f"{len(prepared.meter.models)} models = {prepared.work}, above the server's budget of {limit} "
            f"per request. Lower `{name}`, `n` or `alignment.best_of_n.n`.",
            param=name,
        )

    def _grammar(
        self, request: AlignedRequest, prompt_ids: list[int], sampling: SamplingParams
    ) -> GrammarConstraint | None:
        """The grammar runs inside the generating engine; only the plain strategy has just one."""
        params = request.alignment.grammar
        if params is None:
            return None
        strategy = request.alignment.strategy()
        if strategy is not None:
            raise InvalidRequestError(
                f"`grammar` cannot be combined with `{strategy[0]}`: alignd constrains the generating engine "
                f"only, not every model {strategy[0]} uses.",
                param="alignment.grammar",
            )
        engine = request.engine
        info = engine.info
        tokenizer = getattr(engine, "tokenizer", None)
        in_workers = "grammar" in info.worker_plugins
        if not (info.supports_logits_processors or in_workers) or tokenizer is None:
            raise InvalidRequestError(
                f"The model `{info.name}` cannot run grammar processors: its vLLM workers do not load alignd's "
                "grammar plugin (`vllm.grammar_plugin: false`).",
                param="alignment.grammar",
            )
        compiler = self.grammars.compiler(info.name, tokenizer.hf, info.vocab_size, sorted(info.eos_token_ids))
        return self.grammars.constraint(
            info.name, compiler, params, prompt_ids=prompt_ids, sampling=sampling,
            stop_ids=info.eos_token_ids, in_workers=in_workers,
        )  # fmt: skip

    def _strategy(self, request: AlignedRequest, resources: MeteredResources) -> Strategy:
        """The request's generation strategy; its models are resolved (and metered) now."""
        chosen = request.alignment.strategy()
        if chosen is None:
            return PlainStrategy()
        name, params = chosen
        build = METHODS[name].strategy
        assert build is not None
        return build(params, resources, self.limits)

    async def run(self, prepared: Prepared) -> PipelineResult:
        selection = prepared.request.alignment.best_of_n
        if selection is None:
            candidates = await prepared.strategy.generate(prepared, prepared.sampling.n)
        else:
            candidates = await self._best_of_n(prepared, selection)
        for candidate in candidates:
            candidate.details = {**prepared.details, **candidate.details}
        return PipelineResult(prepared.prompt_ids, candidates, prepared.meter)

    async def stream(self, prepared: Prepared) -> AsyncGenerator[SampleDelta | PipelineResult, None]:
        """Token deltas for plain generation; otherwise the whole result once it is selected."""
        if not prepared.streams_directly:
            yield await self.run(prepared)
            return
        async with aclosing(prepared.engine.stream(prepared.prompt_ids, prepared.sampling)) as deltas:
            async for delta in deltas:
                yield delta

    async def _best_of_n(self, prepared: Prepared, params: best_of_n.BestOfNParams) -> list[Candidate]:
        scorers = best_of_n.scorers_for(params, self.resources)
        candidates = await prepared.strategy.generate(prepared, params.n)
        texts = [candidate.text for candidate in candidates]
        rewards_by_scorer = await best_of_n.score_candidates(scorers, await prepared.prompt_text(), texts)
        rewards = best_of_n.aggregate(rewards_by_scorer, params.aggregate, params.k)
        seed = params.seed if params.seed is not None else prepared.sampling.seed
        # Hashed from a string: independent of the engine's use of the same request seed.
        rng = random.Random(f"best_of_n/{seed}") if seed is not None else random.Random()
        order = best_of_n.selection_order(rewards, texts, params, rng)
        scores = [
            best_of_n.CandidateScore(index=i, reward=rewards[i], rewards=rewards_by_scorer[i])
            for i in range(len(candidates))
        ]
        chosen = []
        for rank, index in enumerate(order[: prepared.sampling.n]):
            candidate = candidates[index]
            candidate.details["best_of_n"] = best_of_n.BestOfNDetails(
                select=params.select, n=params.n, chosen=index, rank=rank, candidates=scores
            )
            chosen.append(candidate)
        return chosen

    def _check_selection(self, request: AlignedRequest, resources: MeteredResources) -> None:
        params = request.alignment.best_of_n
        if params is None:
            return
        if params.n > self.limits.max_best_of_n:
            raise InvalidRequestError(
                f"`alignment.best_of_n.n` must be at most {self.limits.max_best_of_n}, got {params.n}.",
                param="alignment.best_of_n.n",
            )
        if request.sampling.n > params.n:
            raise InvalidRequestError(
                f"`n` ({request.sampling.n}) cannot exceed the {params.n} candidates of best_of_n.", param="n"
            )
        best_of_n.scorers_for(params, resources)

    def _max_tokens(self, engine: Engine, prompt_tokens: int, request: AlignedRequest) -> int:
        """The token budget, checked against the context: the request's, else what is left (capped)."""
        context = engine.info.max_model_len
        prompt_param = "messages" if request.prompt.messages is not None else "prompt"
        if prompt_tokens >= context:
            raise ContextLengthExceededError(
                f"This model's maximum context length is {context} tokens, but the prompt has {prompt_tokens} tokens.",
                param=prompt_param,
            )
        requested = request.requested_max_tokens
        if requested is None:
            return min(self.limits.default_max_tokens, context - prompt_tokens)
        if prompt_tokens + requested > context:
            name = request.budget_param
            raise ContextLengthExceededError(
                f"This model's maximum context length is {context} tokens; the prompt has {prompt_tokens} "
                f"tokens and `{name}` asks for {requested}. Lower `{name}` to at most {context - prompt_tokens}.",
                param=name,
            )
        return requested


async def _prompt_ids(engine: Engine, prompt: PromptInput, rendered: str | None) -> list[int]:
    """The base model's prompt as token ids; a rendered chat prompt already holds its special tokens."""
    if rendered is not None:
        return await engine.tokenize(rendered, add_special_tokens=prompt.messages is None)
    assert prompt.token_ids is not None
    return list(prompt.token_ids)


def details_json(candidate: Candidate) -> dict[str, Any]:
    return {name: record.model_dump(by_alias=True) for name, record in candidate.details.items()}
