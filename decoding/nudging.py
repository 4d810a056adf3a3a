"""Nudging (Fei, Razeghi, Singh 2024): a base model writes, a small aligned nudger steps in where it is unsure.

Word level, so the two models may have different tokenizers and families; they
exchange text only. The base sees a plain-text prompt (system, turns, an answer
cue), the nudger its chat template; both are followed by the answer so far.

- The answer starts with the nudger's first word.
- The base continues in chunks (``logprobs=1``); before each token it checks its
  top-1 probability ``p1``; at the first token with ``p1 < gamma`` (strict) it stops.
- The nudger then completes whole words (a word runs to the next space; newlines
  are not boundaries) and hands back at the first word boundary where the base is
  confident again (``p1 >= gamma``) or where the base's own next token is a prefix
  of the nudger's next word. One base call with the candidate nudge appended and
  prompt logprobs gives ``p1`` at every boundary at once.
- Generation ends on either model's EOS or a stop string, the token budget,
  ``max_rounds``, or a repetition guard (the same nudge three rounds in a row).
"""

from __future__ import annotations

import asyncio
import math
import re
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field

from decoding.base import Candidate, Limits, MethodParams, PromptInput, Resources
from decoding.plain import plain_text_prompt
from models.engine import Engine, FinishReason, SamplingParams
from models.errors import InvalidRequestError

if TYPE_CHECKING:
    from decoding.base import Prepared

_WORD = re.compile(r" *[^ ]+")


class NudgingParams(MethodParams):
    """``alignment.nudging``."""

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
class _Words:
    words: list[str]
    finished: bool


@dataclass(slots=True)
class _BaseChunk:
    text: str
    uncertain_p1: float | None
    finish: FinishReason | None


class Nudging:
    """One nudged generation between a base and a nudger engine.

    Args:
        base: the base engine (plain-text prompt).
        nudger: the nudger engine (chat template).
        base_prompt: the base's prompt, ending with the answer cue.
        nudger_prompt: the nudger's rendered chat prompt, ending with the assistant cue.
        params: gamma, chunk sizes, rounds, temperature.
        max_tokens: the answer's budget in base tokens.
        stop: stop strings; the answer ends before the first.
        seed: seeds both models' sampling (when ``temperature`` > 0).
    """

    def __init__(
        self,
        base: Engine,
        nudger: Engine,
        *,
        base_prompt: str,
        nudger_prompt: str,
        params: NudgingParams,
        max_tokens: int,
        stop: tuple[str, ...] = (),
        seed: int | None = None,
    ) -> None:
        self.base, self.nudger = base, nudger
        self.base_prompt, self.nudger_prompt = base_prompt, nudger_prompt
        self.params = params
        self.max_tokens = max_tokens
        self.stop = stop
        self.seed = seed

    def base_input(self, answer: str) -> str:
        return f"{self.base_prompt} {answer}" if answer else self.base_prompt

    async def run(self) -> tuple[str, FinishReason, NudgingDetails]:
        answer, spans, rounds = "", [], 0
        recent: deque[str] = deque(maxlen=3)
        first = await self._nudger_words(answer)
        stopped_by: StopCause | None = None
        if first.words:
            answer = first.words[0].lstrip(" ")
            spans.append(NudgedSpan(source=self.nudger.info.name, text=answer))
        if not first.words or (first.finished and len(first.words) == 1):
            stopped_by = "eos"
        while stopped_by is None:
            answer, stopped_by = await self._check_end(answer)
            if stopped_by is not None:
                break
            chunk = await self._base_chunk(answer)
            if chunk.text:
                answer += chunk.text
                _append(spans, self.base.info.name, chunk.text)
            if chunk.finish is not None:
                stopped_by = "eos" if chunk.finish == "stop" else "length"
                break
            if chunk.uncertain_p1 is None:
                continue
            if rounds == self.params.max_rounds:
                stopped_by = "max_rounds"
                break
            rounds += 1
            nudge = await self._nudger_words(answer)
            if not nudge.words:
                stopped_by = "eos"
                break
            keep = await self._handback(answer, nudge.words)
            text = "".join(nudge.words[:keep])
            answer += text
            spans.append(NudgedSpan(source=self.nudger.info.name, text=text, base_p1=chunk.uncertain_p1))
            if nudge.finished and keep == len(nudge.words):
                stopped_by = "eos"
            recent.append(text)
            if len(recent) == 3 and len(set(recent)) == 1:
                stopped_by = "repetition"
        answer, cut = _cut_at_stop(answer, self.stop)
        stopped: StopCause = "stop" if cut or stopped_by is None else stopped_by
        finish: FinishReason = "length" if stopped in ("length", "max_rounds") else "stop"
        details = NudgingDetails(
            nudger=self.nudger.info.name,
            spans=spans,
            nudged_token_fraction=await self._nudged_fraction(spans),
            rounds=rounds,
            stopped_by=stopped,
        )
        return answer, finish, details

    async def _check_end(self, answer: str) -> tuple[str, StopCause | None]:
        answer, cut = _cut_at_stop(answer, self.stop)
        if cut:
            return answer, "stop"
        if len(await self.base.tokenize(answer, add_special_tokens=False)) >= self.max_tokens:
            return answer, "length"
        return answer, None

    def _sampling(
        self, max_tokens: int, *, logprobs: int | None = None, prompt_logprobs: int | None = None
    ) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.params.temperature,
            seed=self.seed,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )

    async def _base_chunk(self, answer: str) -> _BaseChunk:
        """Base continuation, cut before its first token with ``p1 < gamma``."""
        ids = await self.base.tokenize(self.base_input(answer))
        completion = await self.base.generate(ids, self._sampling(self.params.base_chunk_tokens, logprobs=1))
        sample = completion.samples[0]
        for position, record in enumerate(sample.logprobs or []):
            p1 = math.exp(record.top[0].logprob if record.top else record.logprob)
            if p1 < self.params.gamma:
                return _BaseChunk(await self.base.detokenize(sample.token_ids[:position]), p1, None)
        return _BaseChunk(sample.text, None, sample.finish_reason if sample.finish_reason == "stop" else None)

    async def _nudger_words(self, answer: str) -> _Words:
        """The nudger's next complete words (its last, cut-off word is dropped unless it is the only one)."""
        ids = await self.nudger.tokenize(self.nudger_prompt + answer, add_special_tokens=False)
        sample = (await self.nudger.generate(ids, self._sampling(self.params.nudge_max_tokens))).samples[0]
        words = _WORD.findall(sample.text)
        finished = sample.finish_reason == "stop"
        if not finished and len(words) > 1 and not sample.text.endswith(" "):
            words = words[:-1]
        return _Words(words, finished)

    async def _handback(self, answer: str, words: list[str]) -> int:
        """How many nudge words to keep: up to the first boundary where the base may take over."""
        if len(words) == 1:
            return 1
        full = await self.base.tokenize(self.base_input(answer + "".join(words)))
        probe = await self.base.generate(full, self._sampling(1, prompt_logprobs=1))
        logprobs = probe.prompt_logprobs or []
        for keep in range(1, len(words)):
            prefix = await self.base.tokenize(self.base_input(answer + "".join(words[:keep])))
            if len(prefix) >= len(full) or full[: len(prefix)] != prefix:
                continue  # the boundary falls inside a base token
            record = logprobs[len(prefix)]
            if record is None or not record.top:
                continue
            top = record.top[0]
            if math.exp(top.logprob) >= self.params.gamma or (top.token and words[keep].startswith(top.token)):
                return keep
        return len(words)

    async def _nudged_fraction(self, spans: list[NudgedSpan]) -> float:
        counts = [len(await self.base.tokenize(span.text, add_special_tokens=False)) for span in spans]
        nudged = sum(c for c, span in zip(counts, spans, strict=True) if span.source == self.nudger.info.name)
        total = sum(counts)
        return nudged / total if total else 0.0


def _append(spans: list[NudgedSpan], source: str, text: str) -> None:
    if spans and spans[-1].source == source and spans[-1].base_p1 is None:
        spans[-1].text += text
    else:
        spans.append(NudgedSpan(source=source, text=text))


def _cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    found = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[: min(found)], True) if found else (text, False)


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
        self._prompt: PromptInput | None = None

    async def render(self, base: Engine, prompt: PromptInput) -> str | None:
        if prompt.messages is None and prompt.text is None:
            raise InvalidRequestError("Nudging needs a text prompt, not token ids.", param="prompt")
        self._prompt = prompt
        return plain_text_prompt(prompt.messages) if prompt.messages is not None else prompt.text

    async def generate(self, prepared: Prepared, n: int) -> list[Candidate]:
        assert self._prompt is not None and prepared.rendered is not None
        messages = self._prompt.messages or [{"role": "user", "content": self._prompt.text or ""}]
        nudger_prompt = await self.nudger.render_chat(messages)
        seed = prepared.sampling.seed

        async def one(index: int) -> Candidate:
            nudging = Nudging(
                prepared.engine,
                self.nudger,
                base_prompt=prepared.rendered or "",
                nudger_prompt=nudger_prompt,
                params=self.params,
                max_tokens=prepared.sampling.max_tokens,
                stop=prepared.sampling.stop,
                seed=None if seed is None else seed + index,
            )
            text, finish, details = await nudging.run()
            ids = await prepared.engine.tokenize(text, add_special_tokens=False)
            return Candidate(text, ids, finish, None, {"nudging": details})

        return list(await asyncio.gather(*(one(i) for i in range(n))))
