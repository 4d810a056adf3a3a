"""The Engine protocol: everything the decoding layer may ask of a model.

A backend (in-process transformers, vLLM workers, scripted fakes in tests)
implements ``Engine``; nothing above ``models/`` knows which one it talks to.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    import torch

    from models.tokenizer import Tokenizer

Prompt = str | Sequence[int]
"""A prompt as text (tokenised by the engine) or as token ids (used as is)."""

FinishReason = Literal["stop", "length"]


class LogitsProcessor(Protocol):
    """Rewrites the next-token logits of one sequence; returns a new tensor.

    Args:
        output_ids: the tokens this sequence has generated so far.
        logits: 1-D next-token logits over the vocabulary; not modified.
    """

    def __call__(self, output_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor: ...


class LogitsProcessorList(list[LogitsProcessor]):
    """Processors applied in order, each to the output of the one before (like transformers'
    ``LogitsProcessorList``); itself a processor."""

    def __call__(self, output_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        for processor in self:
            logits = processor(output_ids, logits)
        return logits


LogitsProcessorFactory = Callable[[], LogitsProcessor]
"""Makes a fresh processor per sampled sequence, so stateful processors
(grammar matchers) never share state between the ``n`` samples. Engines call
processors only for sequences that have not finished."""


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to sample; ``n`` sequences share one prompt prefill.

    ``logprobs``/``prompt_logprobs`` ask for the chosen token plus that many
    alternatives (0 = the chosen token only). Returned logprobs are the
    model's raw log-softmax, before temperature, top-p and processors.

    In-process engines run ``logits_processors``; vLLM engines send
    ``worker_args`` to their workers' plugins (``vllm_xargs``) instead.
    ``affinity`` sends every call with the same key to the same replica (a
    plugin's per-key state lives in one worker), overriding the request's own.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logits_processors: tuple[LogitsProcessorFactory, ...] = ()
    worker_args: Mapping[str, str] = field(default_factory=dict)
    affinity: str | None = None


@dataclass(frozen=True, slots=True)
class TopLogprob:
    token_id: int
    token: str
    logprob: float


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A token with its logprob and the most likely alternatives at its position."""

    token_id: int
    token: str
    logprob: float
    top: tuple[TopLogprob, ...] = ()


@dataclass(slots=True)
class SampleDelta:
    """What one sample added in one streaming step; the last one has ``finish_reason``."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None


@dataclass(slots=True)
class Sample:
    """One finished sequence. ``token_ids`` include a final EOS; ``text`` does not."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    logprobs: list[TokenLogprob] | None = None


@dataclass(slots=True)
class Completion:
    prompt_token_ids: list[int]
    samples: list[Sample]
    prompt_logprobs: list[TokenLogprob | None] | None = None

    @property
    def completion_tokens(self) -> int:
        return sum(len(sample.token_ids) for sample in self.samples)


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """Static facts about a served model."""

    name: str
    max_model_len: int
    max_logprobs: int
    has_chat_template: bool
    tokenizer_id: str = field(default="", compare=False)
    """Identifies the vocabulary: equal ids mean token ids can be exchanged."""
    eos_token_ids: frozenset[int] = frozenset()
    vocab_size: int = 0
    """The width of the model's logits."""
    supports_logits_processors: bool = False
    """In-process: ``SamplingParams.logits_processors`` run inside the engine."""
    worker_plugins: frozenset[str] = frozenset()
    """vLLM: the alignd plugins the workers load (``SamplingParams.worker_args`` reach them)."""


class Engine(Protocol):
    """A model that samples; its tokenizer turns text into the ids it takes and back."""

    @property
    def info(self) -> EngineInfo: ...

    @property
    def tokenizer(self) -> Tokenizer: ...

    async def generate(self, prompt: Prompt, params: SamplingParams) -> Completion: ...

    async def generate_batch(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[Completion]:
        """Several prompts in one engine call (one HTTP request for vLLM)."""
        ...

    def stream(self, prompt: Prompt, params: SamplingParams) -> AsyncGenerator[SampleDelta, None]:
        """Deltas as tokens are sampled; closing the iterator cancels generation."""
        ...

    async def close(self) -> None: ...
