"""The in-process engine: a transformers causal LM behind the Engine protocol."""

from __future__ import annotations

import asyncio
import secrets
import threading
from collections.abc import AsyncGenerator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from models.engine import (
    Completion,
    EngineInfo,
    FinishReason,
    LogitsProcessorList,
    Prompt,
    Sample,
    SampleDelta,
    SamplingParams,
    TokenLogprob,
    TopLogprob,
)
from models.text import IncrementalDetokenizer
from models.tokenizer import Tokenizer

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

Emit = Callable[[SampleDelta], None]


@dataclass(slots=True)
class _Sequence:
    """The state of one of the ``n`` samples while it is generated."""

    index: int
    detokenizer: IncrementalDetokenizer
    processors: LogitsProcessorList
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None

    def advance(self, token_id: int, logprob: TokenLogprob | None, *, eos: bool, at_limit: bool) -> SampleDelta:
        self.token_ids.append(token_id)
        if logprob is not None and self.logprobs is not None:
            self.logprobs.append(logprob)
        text = "" if eos else self.detokenizer.push(token_id)
        if eos or self.detokenizer.stopped:
            self.finish_reason = "stop"
        elif at_limit:
            self.finish_reason = "length"
        if self.finish_reason is not None:
            text += self.detokenizer.flush()
        return SampleDelta(
            index=self.index,
            text=text,
            token_ids=[token_id],
            logprobs=None if logprob is None else [logprob],
            finish_reason=self.finish_reason,
        )

    def to_sample(self) -> Sample:
        return Sample(
            index=self.index,
            text=self.detokenizer.text,
            token_ids=self.token_ids,
            finish_reason=self.finish_reason or "length",
            logprobs=self.logprobs,
        )


class HFEngine:
    """A transformers causal LM served in-process.

    Generation runs on a bounded pool of worker threads (``workers``), never
    on the event loop; requests beyond the pool wait their turn. The ``n``
    samples of a request share one prefill and decode as one batch.

    Args:
        name: the model name clients use.
        path: a directory saved with ``save_pretrained`` (model + tokenizer).
        dtype: torch dtype name for the weights.
        device: torch device.
        max_model_len: context limit; defaults to the model's position limit.
        max_logprobs: the most alternatives a request may ask for per token.
        workers: generations that run at the same time.
    """

    def __init__(
        self,
        name: str,
        path: str | Path,
        *,
        dtype: str = "float32",
        device: str = "cpu",
        max_model_len: int | None = None,
        max_logprobs: int = 20,
        workers: int = 1,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self._torch = torch
        self._device = torch.device(device)
        self._model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
        self._model.eval().to(self._device)
        self._tokenizer = Tokenizer(path, name=name, extra_eos_ids=_as_list(self._model.generation_config.eos_token_id))
        position_limit = int(self._model.config.max_position_embeddings)
        self._info = EngineInfo(
            name=name,
            max_model_len=min(max_model_len or position_limit, position_limit),
            max_logprobs=max_logprobs,
            has_chat_template=self.tokenizer.has_chat_template,
            tokenizer_id=self.tokenizer.fingerprint,
            eos_token_ids=self.tokenizer.eos_ids,
            vocab_size=int(self._model.config.vocab_size),
            supports_logits_processors=True,
        )
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"hf-{name}")

    @property
    def info(self) -> EngineInfo:
        return self._info

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    async def generate(self, prompt: Prompt, params: SamplingParams) -> Completion:
        prompt_ids = self.tokenizer.prompt_ids(prompt)
        cancelled = threading.Event()
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, self._generate, prompt_ids, params, None, cancelled)
        finally:
            cancelled.set()

    async def generate_batch(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[Completion]:
        # One worker slot per prompt; the pool bounds how many run at once.
        return list(await asyncio.gather(*(self.generate(prompt, params) for prompt in prompts)))

    async def stream(self, prompt: Prompt, params: SamplingParams) -> AsyncGenerator[SampleDelta, None]:
        prompt_ids = self.tokenizer.prompt_ids(prompt)
        async with aclosing(self._stream_ids(prompt_ids, params)) as deltas:
            async for delta in deltas:
                yield delta

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _stream_ids(self, prompt_ids: list[int], params: SamplingParams) -> AsyncGenerator[SampleDelta, None]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[SampleDelta | None] = asyncio.Queue()
        cancelled = threading.Event()

        def emit(delta: SampleDelta) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, delta)

        future = loop.run_in_executor(self._executor, self._generate, prompt_ids, params, emit, cancelled)
        # Done-callbacks are scheduled after every delta the worker queued, so None comes last.
        future.add_done_callback(lambda _: queue.put_nowait(None))
        try:
            while (delta := await queue.get()) is not None:
                yield delta
            await future
        finally:
            cancelled.set()
            future.cancel()

    def _generate(
        self, prompt_ids: list[int], params: SamplingParams, emit: Emit | None, cancelled: threading.Event
    ) -> Completion:
        """Runs on a worker thread: prefill once, then decode the ``n`` samples as a batch."""
        torch = self._torch
        generator = torch.Generator(device=self._device)
        generator.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
        sequences = [
            _Sequence(
                index=i,
                detokenizer=IncrementalDetokenizer(self.tokenizer.decode, params.stop),
                processors=LogitsProcessorList(make() for make in params.logits_processors),
                logprobs=[] if params.logprobs is not None else None,
            )
            for i in range(params.n)
        ]
        with torch.inference_mode():
            output = self._model(input_ids=torch.tensor([prompt_ids], device=self._device), use_cache=True)
            prompt_logprobs = None
            if params.prompt_logprobs is not None:
                prompt_logprobs = self._prompt_logprobs(prompt_ids, output.logits[0], params.prompt_logprobs)
            cache = output.past_key_values
            if params.n > 1:
                cache.batch_repeat_interleave(params.n)
            logits = output.logits[:, -1, :].expand(params.n, -1)
            for step in range(params.max_tokens):
                if cancelled.is_set():
                    break
                tokens = self._decode_step(logits, sequences, params, generator, at_limit=step == params.max_tokens - 1)
                if emit is not None:
                    for delta in tokens.deltas:
                        emit(delta)
                if all(seq.finish_reason is not None for seq in sequences):
                    break
                output = self._model(
                    input_ids=torch.tensor(tokens.ids, device=self._device).unsqueeze(1),
                    past_key_values=cache,
                    use_cache=True,
                )
                cache = output.past_key_values
                logits = output.logits[:, -1, :]
        return Completion(prompt_ids, [seq.to_sample() for seq in sequences], prompt_logprobs)

    def _decode_step(
        self,
        logits: torch.Tensor,
        sequences: list[_Sequence],
        params: SamplingParams,
        generator: torch.Generator,
        *,
        at_limit: bool,
    ) -> _StepTokens:
        torch = self._torch
        raw = logits.float()
        logprobs = torch.log_softmax(raw, dim=-1)
        # A finished row's next token is discarded: its processors must not see it (a grammar
        # processor would take the position after EOS for a new prefix of its language).
        processed = torch.stack(
            [
                row if seq.finish_reason is not None else seq.processors(seq.token_ids, row)
                for seq, row in zip(sequences, raw, strict=True)
            ]
        )
        chosen = _sample(processed, params.temperature, params.top_p, generator).tolist()
        step = _StepTokens(ids=chosen, deltas=[])
        top = torch.topk(logprobs, params.logprobs) if params.logprobs else None
        for row, (seq, token_id) in enumerate(zip(sequences, chosen, strict=True)):
            if seq.finish_reason is not None:
                continue
            record = None
            if params.logprobs is not None:
                alternatives = () if top is None else self._top_logprobs(top.values[row], top.indices[row])
                record = TokenLogprob(
                    token_id, self.tokenizer.token_text(token_id), float(logprobs[row, token_id]), alternatives
                )
            step.deltas.append(seq.advance(token_id, record, eos=token_id in self.tokenizer.eos_ids, at_limit=at_limit))
        return step

    def _top_logprobs(self, values: torch.Tensor, indices: torch.Tensor) -> tuple[TopLogprob, ...]:
        return tuple(
            TopLogprob(token_id, self.tokenizer.token_text(token_id), logprob)
            for token_id, logprob in zip(indices.tolist(), values.tolist(), strict=True)
        )

    def _prompt_logprobs(self, prompt_ids: list[int], logits: torch.Tensor, k: int) -> list[TokenLogprob | None]:
        """Logprob of each prompt token given the tokens before it (none for the first)."""
        logprobs = self._torch.log_softmax(logits[:-1].float(), dim=-1)
        targets = self._torch.tensor(prompt_ids[1:], device=logprobs.device)
        chosen = logprobs.gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
        top = self._torch.topk(logprobs, k) if k else None
        records: list[TokenLogprob | None] = [None]
        for position, (token_id, logprob) in enumerate(zip(prompt_ids[1:], chosen, strict=True)):
            alternatives = () if top is None else self._top_logprobs(top.values[position], top.indices[position])
            records.append(TokenLogprob(token_id, self.tokenizer.token_text(token_id), logprob, alternatives))
        return records


@dataclass(slots=True)
class _StepTokens:
    ids: list[int]
    deltas: list[SampleDelta]


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """Greedy at temperature 0, else nucleus sampling from ``softmax(logits / temperature)``."""
    import torch

    if temperature == 0:
        return logits.argmax(dim=-1)
    # Shifted so the largest logit is 0 before dividing: a tiny temperature then gives 0 and -inf, never inf.
    probs = torch.softmax((logits - logits.max(dim=-1, keepdim=True).values) / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the mass before it already reaches top_p; the top token always stays (a top_p
        # below the rounding error of the sum would otherwise drop it too).
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        outside[..., 0] = False
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


def _as_list(ids: int | Sequence[int] | None) -> list[int]:
    if ids is None:
        return []
    return [ids] if isinstance(ids, int) else list(ids)
