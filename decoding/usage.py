"""Usage metering: every engine call of one request counts into its ``UsageMeter``."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from opentelemetry import trace

from decoding.base import Resources
from decoding.tracing import engine_span, record_tokens
from models.engine import Completion, Engine, EngineInfo, Prompt, SampleDelta, SamplingParams

if TYPE_CHECKING:
    from models.scorers import ScoredPair, Scorer
    from models.tokenizer import Tokenizer


@dataclass(slots=True)
class ModelUsage:
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(slots=True)
class UsageMeter:
    """Tokens by model, over every engine call of one request."""

    by_model: dict[str, ModelUsage] = field(default_factory=dict)
    engine_calls: int = 0
    reward_calls: int = 0
    """Calls to reward scorers (each scores a batch of responses)."""
    models: set[str] = field(default_factory=set)
    """Every engine and scorer the request resolved, known before any work."""

    def record(self, model: str, *, prompt: int, completion: int) -> None:
        usage = self.by_model.setdefault(model, ModelUsage())
        usage.prompt_tokens += prompt
        usage.completion_tokens += completion

    def record_completion(self, model: str, completion: Completion) -> None:
        self.record(model, prompt=len(completion.prompt_token_ids), completion=completion.completion_tokens)

    @property
    def prompt_tokens(self) -> int:
        return sum(usage.prompt_tokens for usage in self.by_model.values())

    @property
    def completion_tokens(self) -> int:
        return sum(usage.completion_tokens for usage in self.by_model.values())


class MeteredEngine:
    """An engine whose calls are counted into a request's ``UsageMeter``.

    Prompt tokens count once per call (the ``n`` samples of a call share a prefill).
    """

    def __init__(self, engine: Engine, meter: UsageMeter) -> None:
        self.engine = engine
        self.meter = meter

    @property
    def info(self) -> EngineInfo:
        return self.engine.info

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    async def generate(self, prompt: Prompt, params: SamplingParams) -> Completion:
        self.meter.engine_calls += 1
        span = engine_span("generate", self.info.name)
        with trace.use_span(span, end_on_exit=True):
            completion = await self.engine.generate(prompt, params)
            record_tokens(span, len(completion.prompt_token_ids), completion.completion_tokens)
        self.meter.record_completion(self.info.name, completion)
        return completion

    async def generate_batch(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[Completion]:
        self.meter.engine_calls += 1
        span = engine_span("generate_batch", self.info.name)
        with trace.use_span(span, end_on_exit=True):
            completions = await self.engine.generate_batch(prompts, params)
            record_tokens(span, sum(len(c.prompt_token_ids) for c in completions),
                          sum(c.completion_tokens for c in completions))  # fmt: skip
        for completion in completions:
            self.meter.record_completion(self.info.name, completion)
        return completions

    async def stream(self, prompt: Prompt, params: SamplingParams) -> AsyncGenerator[SampleDelta, None]:
        self.meter.engine_calls += 1
        prompt_tokens, completion_tokens = len(self.tokenizer.prompt_ids(prompt)), 0
        self.meter.record(self.info.name, prompt=prompt_tokens, completion=0)
        span = engine_span("stream", self.info.name)
        try:
            async with aclosing(self.engine.stream(prompt, params)) as deltas:
                while True:
                    # Current only while the engine works, never across a yield to the consumer.
                    with trace.use_span(span, end_on_exit=False):
                        try:
                            delta = await anext(deltas)
                        except StopAsyncIteration:
                            break
                    completion_tokens += len(delta.token_ids)
                    self.meter.record(self.info.name, prompt=0, completion=len(delta.token_ids))
                    yield delta
        finally:
            record_tokens(span, prompt_tokens, completion_tokens)
            span.end()

    async def close(self) -> None:
        return None


class MeteredScorer:
    """A reward scorer whose calls are counted into a request's ``UsageMeter``."""

    def __init__(self, scorer: Scorer, meter: UsageMeter) -> None:
        self.scorer = scorer
        self.meter = meter
        self.name = scorer.name

    async def score(self, pairs: Sequence[ScoredPair]) -> list[float]:
        self.meter.reward_calls += 1
        return await self.scorer.score(pairs)

    async def close(self) -> None:
        return None


class MeteredResources:
    """Resources whose engines count into one request's meter."""

    def __init__(self, resources: Resources, meter: UsageMeter) -> None:
        self._resources = resources
        self.meter = meter

    def engine(self, name: str, *, param: str) -> Engine:
        engine = MeteredEngine(self._resources.engine(name, param=param), self.meter)
        self.meter.models.add(name)
        return engine

    def scorer(self, name: str, *, param: str) -> Scorer:
        scorer = MeteredScorer(self._resources.scorer(name, param=param), self.meter)
        self.meter.models.add(name)
        return scorer
