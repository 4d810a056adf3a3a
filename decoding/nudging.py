"""Nudging (Fei, Razeghi, Singh 2024): a base model writes, a small aligned nudger steps in where it is unsure.

Word level, so the two models may have different tokenizers. The answer starts with the
nudger's first word; the base continues in chunks (``logprobs=1``) and stops before its
first token with top-1 probability ``p1 < gamma``; the nudger then writes whole words (to
the next space) and hands back at the first boundary where the base is confident again or
the base's own next token begins the nudger's next word (one base call with prompt
logprobs scores every boundary). It ends on either model's EOS or a stop string, the
budget, ``max_rounds``, or the same nudge three rounds in a row.

Each model continues from its own token ids for the text it wrote (``decoding.transcript``):
re-encoding a model's own text would change its greedy continuation at every hand-over.
"""

from __future__ import annotations

import math
import re
from collections import deque
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field

from decoding.base import (
    NEXT_TURN,
    Candidate,
    Generation,
    GenerationJob,
    Limits,
    MethodParams,
    PromptInput,
    Resources,
    base_prompt_text,
    cut_at_stop,
    generate_each,
)
from decoding.transcript import Piece, View
from models.engine import Engine, FinishReason, SamplingParams
from models.errors import InvalidRequestError

_WORD = re.compile(r" *[^ ]+")


class NudgingParams(MethodParams):
    """``alignment.nudging``: where the base is unsure, a small aligned model writes the next words."""

    nudger: str = Field(description="The small aligned model (a served model name).")
    gamma: float = Field(default=0.4, ge=0, le=1, description="The base hands over when its top-1 p < gamma.")
    nudge_max_tokens: int = Field(default=16, ge=1, le=256, description="Tokens per nudger call.")
    base_chunk_tokens: int = Field(default=16, ge=1, le=256, description="Tokens per base continuation call.")
    max_rounds: int = Field(default=150, ge=1, le=1000, description="Nudges at most (also a server limit).")
    temperature: float = Field(default=0.0, ge=0, le=2, description="Both models; 0 is greedy, as in the paper.")


class NudgedSpan(BaseModel):
    source: str = Field(description="The model that wrote the span.")
    text: str
    base_p1: float | None = Field(default=None, description="For a nudge: the base's top-1 p where it began.")


StopCause = Literal["eos", "stop", "length", "max_rounds", "repetition"]


class NudgingDetails(BaseModel):
    nudger: str
    spans: list[NudgedSpan]
    nudged_token_fraction: float
    rounds: int
    stopped_by: StopCause


@dataclass(slots=True)
class _Nudge:
    """The nudger's next whole words, and the tokens it wrote them with."""

    words: list[str]
    token_ids: list[int]
    finished: bool

    def text(self, keep: int) -> str:
        return "".join(self.words[:keep])


@dataclass(slots=True)
class _BaseChunk:
    piece: Piece
    uncertain_p1: float | None
    finish: FinishReason | None


class Nudging:
    """One nudged generation between a base and a nudger engine.

    Args:
        base: the base engine.
        nudger: the nudger engine (chat template).
        base_prompt_ids: the base's prompt, ending with the answer cue.
        nudger_prompt_ids: the nudger's rendered chat prompt, ending with the assistant cue.
        params: gamma, chunk sizes, rounds, temperature.
        max_tokens: the answer's budget in base tokens.
        stop: stop strings; the answer ends before the first.
        seed: seeds both models' sampling (when ``temperature`` > 0).
        separator: what the base sees between its prompt and the answer (a space after a plain-text
            cue such as ``Assistant:``); None: the spaces the nudger began its answer with, for a base
            that is prompted like the nudger.
    """

    def __init__(
        self,
        base: Engine,
        nudger: Engine,
        *,
        base_prompt_ids: list[int],
        nudger_prompt_ids: list[int],
        params: NudgingParams,
        max_tokens: int,
        stop: tuple[str, ...] = (),
        seed: int | None = None,
        separator: str | None = " ",
    ) -> None:
        self.base, self.nudger = base, nudger
        self.base_view, self.nudger_view = View(base, base_prompt_ids), View(nudger, nudger_prompt_ids)
        self.params = params
        self.max_tokens = max_tokens
        self.stop = stop
        self.seed = seed
        self.separator = separator
        self.answer = ""
        self.spans: list[NudgedSpan] = []
        self.rounds = 0
        self.recent: deque[str] = deque(maxlen=3)

    async def run(self) -> tuple[str, FinishReason, NudgingDetails]:
        """The nudged answer, its finish reason and what happened (call once per instance)."""
        first = await self._nudger_words()
        stopped_by: StopCause | None = None
        if first.words:
            self._begin(first)
        if not first.words or (first.finished and len(first.words) == 1):
            stopped_by = "eos"
        while stopped_by is None:
            stopped_by = await self._step()
        answer, _ = cut_at_stop(self.answer, self.stop)
        spans = _within(self.spans, len(answer))
        finish: FinishReason = "length" if stopped_by in ("length", "max_rounds") else "stop"
        details = NudgingDetails(
            nudger=self.nudger.info.name,
            spans=spans,
            nudged_token_fraction=self._nudged_fraction(spans),
            rounds=self.rounds,
            stopped_by=stopped_by,
        )
        return answer, finish, details

    async def _step(self) -> StopCause | None:
        """A base chunk and, where the base became unsure, a nudge; why generation ends, if it does."""
        if self.base_view.answer_tokens() >= self.max_tokens:
            return "length"
        chunk = await self._base_chunk()
        if chunk.piece.text:
            self.answer += self._share(chunk.piece)
            _append(self.spans, self.base.info.name, chunk.piece.text)
        if cut_at_stop(self.answer, self.stop)[1]:
            return "stop"
        if chunk.finish is not None:
            return "eos" if chunk.finish == "stop" else "length"
        if chunk.uncertain_p1 is None:
            return None
        if self.rounds == self.params.max_rounds:
            return "max_rounds"
        return await self._nudge(chunk.uncertain_p1)

    async def _nudge(self, base_p1: float) -> StopCause | None:
        """The nudger's words up to the hand-back boundary."""
        self.rounds += 1
        nudge = await self._nudger_words()
        if not nudge.words:
            return "eos"
        keep = await self._handback(nudge)
        piece = self._nudger_piece(nudge, keep)
        self.answer += self._share(piece)
        self.spans.append(NudgedSpan(source=self.nudger.info.name, text=piece.text, base_p1=base_p1))
        if cut_at_stop(self.answer, self.stop)[1]:
            return "stop"
        self.recent.append(piece.text)
        if len(self.recent) == 3 and len(set(self.recent)) == 1:
            return "repetition"
        return "eos" if nudge.finished and keep == len(nudge.words) else None

    def _share(self, piece: Piece) -> str:
        """Shows a piece of the answer to both models; returns its text."""
        self.base_view.add(piece)
        self.nudger_view.add(piece)
        return piece.text

    def _begin(self, first: _Nudge) -> None:
        """The answer's first word: the nudger keeps its own tokens (leading spaces included), the answer
        and the base drop the leading spaces and the base sees its separator instead."""
        own = self._nudger_piece(first, 1)
        self.nudger_view.add(own)
        word = own.text.lstrip(" ")
        lead = own.text[: len(own.text) - len(word)]
        separator = lead if self.separator is None else self.separator
        shared = own if separator == lead else Piece(separator + word, [], own.vocabulary, 0)
        self.base_view.add(shared)
        self.answer = word
        self.spans.append(NudgedSpan(source=self.nudger.info.name, text=word))

    def _sampling(self, max_tokens: int, logprobs: int | None = None, prompt: int | None = None) -> SamplingParams:
        """Both models sample alike; ``logprobs`` for generated tokens, ``prompt`` for the prompt's."""
        return SamplingParams(max_tokens=max_tokens, temperature=self.params.temperature, seed=self.seed,
                              logprobs=logprobs, prompt_logprobs=prompt)  # fmt: skip

    async def _base_chunk(self) -> _BaseChunk:
        """Base continuation within the budget, cut before its first token with ``p1 < gamma``."""
        budget = self.max_tokens - self.base_view.answer_tokens()
        params = self._sampling(min(self.params.base_chunk_tokens, budget), logprobs=1)
        sample = (await self.base.generate(self.base_view.ids(), params)).samples[0]
        for position, record in enumerate(sample.logprobs or []):
            p1 = math.exp(record.top[0].logprob if record.top else record.logprob)
            if p1 < self.params.gamma:
                return _BaseChunk(self.base_view.own_piece(sample.token_ids[:position]), p1, None)
        ended = sample.finish_reason == "stop"
        return _BaseChunk(self.base_view.own_piece(sample.token_ids), None, "stop" if ended else None)

    async def _nudger_words(self) -> _Nudge:
        """The nudger's next complete words (its last, cut-off word is dropped unless it is the only one)."""
        params = self._sampling(self.params.nudge_max_tokens)
        sample = (await self.nudger.generate(self.nudger_view.ids(), params)).samples[0]
        words = _WORD.findall(sample.text)
        finished = sample.finish_reason == "stop"
        if not finished and len(words) > 1 and not sample.text.endswith(" "):
            words = words[:-1]
        return _Nudge(words, sample.token_ids, finished)

    def _nudger_piece(self, nudge: _Nudge, keep: int) -> Piece:
        return self.nudger_view.own_piece(nudge.token_ids, text=nudge.text(keep))

    async def _handback(self, nudge: _Nudge) -> int:
        """How many nudge words to keep: up to the first boundary where the base may take over."""
        words = nudge.words
        if len(words) == 1:
            return 1
        full = self.base_view.ids_with(self._nudger_piece(nudge, len(words)))
        probe = await self.base.generate(full, self._sampling(1, prompt=1))
        logprobs = probe.prompt_logprobs or []
        for keep in range(1, len(words)):
            prefix = self.base_view.ids_with(self._nudger_piece(nudge, keep))
            if len(prefix) >= len(full) or full[: len(prefix)] != prefix:
                continue  # the boundary falls inside a base token
            record = logprobs[len(prefix)]
            if record is None or not record.top:
                continue
            top = record.top[0]
            if math.exp(top.logprob) >= self.params.gamma or (top.token and words[keep].startswith(top.token)):
                return keep
        return len(words)

    def _nudged_fraction(self, spans: list[NudgedSpan]) -> float:
        """The share of the answer's base tokens that lie in nudged spans, the answer tokenised as the base sees
        it after its prompt (a measure only; nothing is generated from it). A span owns the tokens its text
        adds to the tokenisation of the text before it, so a word is counted once, as the base would write it."""
        encode = self.base.tokenizer.encode
        text, before, nudged = self.separator or "", 0, 0
        for span in spans:
            text += span.text
            after = len(encode(text, add_special_tokens=False))
            if span.source == self.nudger.info.name:
                nudged += after - before
            before = after
        return nudged / before if before else 0.0


def _append(spans: list[NudgedSpan], source: str, text: str) -> None:
    if spans and spans[-1].source == source and spans[-1].base_p1 is None:
        spans[-1].text += text
    else:
        spans.append(NudgedSpan(source=source, text=text))


def _within(spans: list[NudgedSpan], length: int) -> list[NudgedSpan]:
    """The spans of the answer's first ``length`` characters (what a stop string left of it)."""
    kept, end = [], 0
    for span in spans:
        if end >= length:
            break
        kept.append(span.model_copy(update={"text": span.text[: length - end]}))
        end += len(span.text)
    return [span for span in kept if span.text]


class NudgingStrategy:
    """Nudging as a pipeline strategy: ``n`` nudged answers run concurrently."""

    def __init__(self, params: NudgingParams, resources: Resources, limits: Limits) -> None:
        self.nudger = resources.engine(params.nudger, param="alignment.nudging.nudger")
        limit = limits.max_nudging_rounds
        if "max_rounds" in params.model_fields_set and params.max_rounds > limit:
            raise InvalidRequestError(
                f"`alignment.nudging.max_rounds` must be at most {limit}, got {params.max_rounds}.",
                param="alignment.nudging.max_rounds",
            )
        # An unset max_rounds means "as many as the server allows".
        self.params = params.model_copy(update={"max_rounds": min(params.max_rounds, limit)})
        if not self.nudger.info.has_chat_template:
            raise InvalidRequestError(
                f"The nudger `{params.nudger}` has no chat template; a nudger must be a chat model.",
                param="alignment.nudging.nudger",
            )

    def render(self, base: Engine, prompt: PromptInput) -> str | None:
        if prompt.messages is None and prompt.text is None:
            raise InvalidRequestError("Nudging needs a text prompt, not token ids.", param="prompt")
        return base_prompt_text(base, prompt)

    def check(self, job: GenerationJob) -> None:
        return None

    def work(self, job: GenerationJob) -> int:
        return 0

    async def generate(self, job: GenerationJob, n: int) -> Generation:
        prompt = job.prompt
        messages = prompt.messages or [{"role": "user", "content": prompt.text or ""}]
        tokenizer = self.nudger.tokenizer
        nudger_prompt = tokenizer.encode(tokenizer.render_chat(messages), add_special_tokens=False)
        # A base on its chat template is prompted like the nudger; after a plain-text cue it needs a space.
        on_template = job.engine.info.has_chat_template
        separator = None if prompt.messages is not None and on_template else " "
        # A chat rendered as plain text ends where the base starts the next turn of the transcript itself.
        stop = job.sampling.stop if on_template or prompt.messages is None else (*job.sampling.stop, NEXT_TURN)

        async def one(seed: int | None) -> Candidate:
            nudging = Nudging(
                job.engine,
                self.nudger,
                base_prompt_ids=job.prompt_ids,
                nudger_prompt_ids=nudger_prompt,
                params=self.params,
                max_tokens=job.sampling.max_tokens,
                stop=stop,
                seed=seed,
                separator=separator,
            )
            text, finish, details = await nudging.run()
            ids = job.engine.tokenizer.encode(text, add_special_tokens=False)
            return Candidate(text, ids, finish, None, {"nudging": details})

        return Generation(await generate_each(n, job.sampling.seed, one))
