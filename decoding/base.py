"""What every alignment method shares: the prompt it sees, the resources it may use, usage metering.

A method is a module in ``decoding/`` with a pydantic ``...Params`` model, its
implementation and a ``...Details`` record, registered in ``decoding.registry``.
Methods reach models only through ``Resources`` (engines and scorers by
name, validated against their role) and never load anything themselves.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol

from pydantic import BaseModel, ConfigDict

from models.engine import (
    Completion,
    Engine,
    EngineInfo,
    FinishReason,
    Prompt,
    SampleDelta,
    SamplingParams,
    TokenLogprob,
)

if TYPE_CHECKING:
    from decoding.grammar import GrammarConstraint
    from decoding.pipeline import AlignedRequest
    from models.scorers import Scorer


@dataclass(frozen=True, slots=True)
class Limits:
    """Server bounds on what one request may ask of the methods."""

    default_max_tokens: int = 256
    max_best_of_n: int = 16
    max_nudging_rounds: int = 150
    max_transfer_q_work: int = 20_000
    """Transfer-Q*: top_k x rollouts x (rollout_tokens + 1) x decision steps."""
    max_request_work: int = 262_144
    """Any request: samples x max_tokens x models (see ``Prepared.work``)."""


class MethodParams(BaseModel):
    """Base of every method's parameters: unknown fields are errors."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


@dataclass(slots=True)
class PromptInput:
    """The client's prompt: chat messages, or a completions prompt as text or token ids."""

    messages: list[dict[str, str]] | None = None
    text: str | None = None
    token_ids: list[int] | None = None

    @property
    def query(self) -> str:
        """The user's request in words: the last user message, else the prompt text."""
        if self.messages is not None:
            users = [m["content"] for m in self.messages if m["role"] == "user"]
            return users[-1] if users else self.messages[-1]["content"]
        return self.text or ""


class Resources(Protocol):
    """The models and scorers a method may use, looked up by the names requests give."""

    def engine(self, name: str, *, param: str) -> Engine: ...

    def scorer(self, name: str, *, param: str) -> Scorer: ...


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
        scorer = self._resources.scorer(name, param=param)
        self.meter.models.add(name)
        return scorer


@dataclass(slots=True)
class ModelUsage:
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(slots=True)
class UsageMeter:
    """Tokens by model, over every engine call of one request."""

    by_model: dict[str, ModelUsage] = field(default_factory=dict)
    engine_calls: int = 0
    models: set[str] = field(default_factory=set)
    """Every engine and scorer the request resolved, known before any work."""

    def record(self, model: str, *, prompt: int, completion: int) -> None:
        usage = self.by_model.setdefault(model, ModelUsage())
        usage.prompt_tokens += prompt
        usage.completion_tokens += completion

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

    async def tokenize(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return await self.engine.tokenize(text, add_special_tokens=add_special_tokens)

    async def detokenize(self, token_ids: Sequence[int]) -> str:
        return await self.engine.detokenize(token_ids)

    async def render_chat(self, messages: Sequence[Mapping[str, str]]) -> str:
        return await self.engine.render_chat(messages)

    async def generate(self, prompt: Prompt, params: SamplingParams) -> Completion:
        self.meter.engine_calls += 1
        completion = await self.engine.generate(prompt, params)
        self.meter.record(
            self.info.name, prompt=len(completion.prompt_token_ids), completion=completion.completion_tokens
        )
        return completion

    async def generate_batch(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[Completion]:
        self.meter.engine_calls += 1
        completions = await self.engine.generate_batch(prompts, params)
        for completion in completions:
            self.meter.record(
                self.info.name, prompt=len(completion.prompt_token_ids), completion=completion.completion_tokens
            )
        return completions

    async def stream(self, prompt: Prompt, params: SamplingParams) -> AsyncGenerator[SampleDelta, None]:
        self.meter.engine_calls += 1
        prompt_tokens = len(prompt) if not isinstance(prompt, str) else len(await self.tokenize(prompt))
        self.meter.record(self.info.name, prompt=prompt_tokens, completion=0)
        async with aclosing(self.engine.stream(prompt, params)) as deltas:
            async for delta in deltas:
                self.meter.record(self.info.name, prompt=0, completion=len(delta.token_ids))
                yield delta

    async def close(self) -> None:
        return None


def with_n(params: SamplingParams, n: int) -> SamplingParams:
    return replace(params, n=n)


@dataclass(slots=True)
class Candidate:
    """One generated answer, with what the methods recorded about it."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    logprobs: list[TokenLogprob] | None = None
    details: dict[str, BaseModel] = field(default_factory=dict)


@dataclass(slots=True)
class Prepared:
    """A request after validation, the prompt stage and tokenisation: ready to generate."""

    request: AlignedRequest
    engine: MeteredEngine
    strategy: Strategy
    prompt: PromptInput
    prompt_ids: list[int]
    sampling: SamplingParams
    meter: UsageMeter
    rendered: str | None = None
    details: dict[str, BaseModel] = field(default_factory=dict)
    constraint: GrammarConstraint | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None

    async def prompt_text(self) -> str:
        """The base model's prompt as text (chat: its template applied): what reward models see."""
        return self.rendered if self.rendered is not None else await self.engine.detokenize(self.prompt_ids)

    @property
    def samples(self) -> int:
        """Samples the strategy draws: best-of-N's candidates, else ``n``."""
        selection = self.request.alignment.best_of_n
        return selection.n if selection is not None else self.sampling.n

    @property
    def work(self) -> int:
        """The compute the request asked for: samples x max_tokens x models (generating engines and scorers)."""
        return self.samples * self.sampling.max_tokens * len(self.meter.models)

    @property
    def streams_directly(self) -> bool:
        """Plain generation without selection streams token by token from the engine."""
        return self.request.alignment.best_of_n is None and self.request.alignment.strategy() is None


class Strategy(Protocol):
    """A generation strategy: how the base prompt is written, and how ``n`` candidates are made."""

    async def render(self, base: Engine, prompt: PromptInput) -> str | None:
        """The base model's prompt text (None: the client's token ids are used as they are)."""
        ...

    async def generate(self, prepared: Prepared, n: int) -> list[Candidate]: ...
