"""What every alignment method shares: the limits, the prompt, the models it may use, a generated answer.

A method is a module in ``decoding/`` with a pydantic ``...Params`` model, its
implementation, a ``...Details`` record and its stage hook, registered in
``decoding.registry``. Methods reach models only through ``Resources`` (engines
and scorers by name, validated against their role) and never load anything.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict, Field

from models.engine import Engine, FinishReason, SamplingParams, TokenLogprob

if TYPE_CHECKING:
    from models.scorers import Scorer


class Limits(BaseModel):
    """Bounds on what one request may ask for: the only definition of their defaults."""

    model_config = ConfigDict(extra="forbid")

    max_n: int = Field(default=8, ge=1)
    max_best_of_n: int = Field(default=16, ge=1, description="Largest `alignment.best_of_n.n`.")
    max_nudging_rounds: int = Field(default=150, ge=1, description="Largest `alignment.nudging.max_rounds`.")
    max_grammar_bytes: int = Field(default=65_536, ge=1, description="Largest grammar or schema accepted.")
    max_trie_nodes: int = Field(default=1_000_000, ge=1, description="ASAp: the trie store's node budget (LRU).")
    max_guided_work: int = Field(
        default=20_000,
        ge=1,
        description="Token-guided decoding: the work of a decision step x decision steps. A Transfer-Q* step is "
        "top_k x rollouts x (rollout_tokens + 1), a GenARM step top_k.",
    )
    max_request_work: int = Field(
        default=262_144,
        ge=1,
        description="Compute budget of one request: samples x max_tokens x models (generating engines and scorers), "
        "plus every answer's token-guided work (Transfer-Q*'s rollouts, GenARM's candidates).",
    )
    max_body_bytes: int = Field(
        default=4 * 1024 * 1024, ge=1024, description="Largest request body read; larger ones are a 413."
    )
    max_logprobs: int = Field(default=20, ge=0)
    max_reward_inputs: int = Field(
        default=64, ge=1, description="Most (prompt, response) pairs one `/v1/rewards` call scores."
    )
    default_max_tokens: int = Field(default=256, ge=1, description="Chat `max_tokens` when the client sets none.")


class MethodParams(BaseModel):
    """Base of every method's parameters: unknown fields are errors."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    shares_tokenizer: ClassVar[tuple[str, ...]] = ()
    """The fields naming models that read the base's token ids: they must share its tokenizer (checked per
    request, and at start-up for profiles)."""


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


@dataclass(slots=True)
class Candidate:
    """One generated answer, with what the methods recorded about it."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    logprobs: list[TokenLogprob] | None = None
    details: dict[str, BaseModel] = field(default_factory=dict)


@dataclass(slots=True)
class Generation:
    """What a strategy returns: its candidates, and the prompt's logprobs where they were asked for."""

    candidates: list[Candidate]
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass(frozen=True, slots=True)
class GenerationJob:
    """A request after the prompt stage and tokenisation: what a strategy generates from.

    Args:
        engine: the base model (metered).
        prompt: the prompt after the prompt stage (guidelines injected).
        rendered: the base model's prompt as text (None: the client's token ids).
        prompt_ids: the base model's prompt as token ids.
        sampling: the request's sampling, with its token budget and engine constraints applied.
    """

    engine: Engine
    prompt: PromptInput
    rendered: str | None
    prompt_ids: list[int]
    sampling: SamplingParams

    @property
    def prompt_text(self) -> str:
        """The base model's prompt as text (chat: its template applied): what reward models see."""
        return self.rendered if self.rendered is not None else self.engine.tokenizer.decode(self.prompt_ids)


class Strategy(Protocol):
    """A generation strategy, built per request: how the base prompt is written, how candidates are made."""

    def render(self, base: Engine, prompt: PromptInput) -> str | None:
        """The base model's prompt text (None: the client's token ids are used as they are)."""
        ...

    def check(self, job: GenerationJob) -> None:
        """Refuses, before any generation, what this strategy cannot do for the job (a 400)."""
        ...

    def work(self, job: GenerationJob) -> int:
        """Work units per answer beyond sampling the job's tokens from each model it uses: a token-guided
        method's decision steps (Transfer-Q*'s rollouts, say); 0 for the others."""
        ...

    async def generate(self, job: GenerationJob, n: int) -> Generation: ...


def with_n(params: SamplingParams, n: int) -> SamplingParams:
    return replace(params, n=n)


NEXT_TURN = "\nUser:"
"""Where a plain-text chat's answer ends: a base model that writes it has begun the next turn itself."""


def plain_text_prompt(messages: Sequence[Mapping[str, str]], cue: str = "Assistant:") -> str:
    """A chat as plain text, for base models without a chat template: system text, turns, an answer cue."""
    lines = []
    for message in messages:
        if message["role"] == "system":
            lines.append(f"{message['content']}\n")
        else:
            lines.append(f"{'User' if message['role'] == 'user' else 'Assistant'}: {message['content']}")
    return "\n".join([*lines, cue])


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """The text before the first stop string, and whether there was one."""
    found = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[: min(found)], True) if found else (text, False)


def base_prompt_text(base: Engine, prompt: PromptInput) -> str | None:
    """A multi-model strategy's base prompt: the base's chat template if it has one, else plain text."""
    if prompt.messages is None:
        return prompt.text
    if base.info.has_chat_template:
        return base.tokenizer.render_chat(prompt.messages)
    return plain_text_prompt(prompt.messages)


def prompt_token_ids(engine: Engine, prompt: PromptInput, rendered: str | None) -> list[int]:
    """The base model's prompt as token ids; a rendered chat prompt already holds its special tokens."""
    if rendered is not None:
        return engine.tokenizer.encode(rendered, add_special_tokens=prompt.messages is None)
    assert prompt.token_ids is not None
    return engine.tokenizer.check_ids(prompt.token_ids)


async def generate_each(
    n: int, seed: int | None, generate_one: Callable[[int | None], Awaitable[Candidate]]
) -> list[Candidate]:
    """``n`` independent generations at once, the i-th seeded with ``seed + i`` (all unseeded without a seed)."""
    return list(await asyncio.gather(*(generate_one(None if seed is None else seed + i) for i in range(n))))
