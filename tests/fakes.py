"""Scripted engines and scorers with exact distributions, for unit tests of the methods."""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Mapping, Sequence

from decoding.base import Limits, Resources
from decoding.grammar import GrammarService
from decoding.guidelines import GuidelineLibrary, GuidelineRetriever
from decoding.pipeline import Pipeline
from decoding.stages import Services
from models.engine import (
    Completion,
    EngineInfo,
    Prompt,
    Sample,
    SampleDelta,
    SamplingParams,
    TokenLogprob,
    TopLogprob,
)
from models.errors import InvalidRequestError
from models.scorers import Scorer


class FakeTokenizer(ABC):
    """The text side of a fake engine; subclasses say what a token is."""

    has_chat_template = True

    @abstractmethod
    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]: ...

    @abstractmethod
    def decode(self, token_ids: Sequence[int]) -> str: ...

    def encode_continuation(self, text: str) -> list[int]:
        return self.encode(text, add_special_tokens=False)

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        return self.encode(prompt) if isinstance(prompt, str) else self.check_ids(prompt)

    def check_ids(self, token_ids: Sequence[int]) -> list[int]:
        if not token_ids:
            raise InvalidRequestError("Token ids must be a non-empty list.", param="prompt")
        return list(token_ids)

    def token_text(self, token_id: int) -> str:
        return self.decode([token_id])

    def render_chat(self, messages: Sequence[Mapping[str, str]]) -> str:
        return "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>"


class CharTokenizer(FakeTokenizer):
    """Tokens are characters (``ord``), so prompts and answers round-trip exactly."""

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, token_ids: Sequence[int]) -> str:
        return "".join(chr(t) for t in token_ids)


class CategoricalEngine:
    """Each sample is one whole answer drawn from a fixed categorical distribution (tokens are characters)."""

    def __init__(self, answers: Mapping[str, float], *, name: str = "fake", max_model_len: int = 4096) -> None:
        self.answers = list(answers)
        self.weights = list(answers.values())
        self.calls: list[SamplingParams] = []
        self._info = EngineInfo(name, max_model_len, 20, True, "chars")
        self.tokenizer = CharTokenizer()

    @property
    def info(self) -> EngineInfo:
        return self._info

    def _samples(self, params: SamplingParams) -> list[Sample]:
        self.calls.append(params)
        rng = random.Random(params.seed)
        texts = rng.choices(self.answers, weights=self.weights, k=params.n)
        return [Sample(i, text, [ord(c) for c in text], "stop") for i, text in enumerate(texts)]

    async def generate(self, prompt: Prompt, params: SamplingParams) -> Completion:
        return Completion(self.tokenizer.prompt_ids(prompt), self._samples(params))

    async def generate_batch(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[Completion]:
        return [await self.generate(prompt, params) for prompt in prompts]

    async def stream(self, prompt: Prompt, params: SamplingParams) -> AsyncGenerator[SampleDelta, None]:
        for sample in self._samples(params):
            yield SampleDelta(sample.index, sample.text, sample.token_ids, None, sample.finish_reason)

    async def close(self) -> None:
        return None


class TableScorer:
    """Rewards from a table of responses; counts its (batched) calls."""

    def __init__(self, rewards: Mapping[str, float], *, name: str = "rm") -> None:
        self.name = name
        self.rewards = dict(rewards)
        self.batches: list[int] = []

    async def score(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        self.batches.append(len(pairs))
        return [self.rewards[response] for _, response in pairs]

    async def close(self) -> None:
        return None


class FakeResources:
    def __init__(self, engines: Mapping[str, object] = (), scorers: Sequence[Scorer] = ()) -> None:
        self.engines = dict(engines)
        self.scorers = {scorer.name: scorer for scorer in scorers}

    def engine(self, name: str, *, param: str):  # type: ignore[no-untyped-def]
        if name not in self.engines:
            raise InvalidRequestError(f"`{name}` is not a served model.", param=param)
        return self.engines[name]

    def scorer(self, name: str, *, param: str) -> Scorer:
        if name not in self.scorers:
            raise InvalidRequestError(f"`{name}` is not a configured reward scorer.", param=param)
        return self.scorers[name]


EOS = "<eos>"


class WordTokenizer(FakeTokenizer):
    """Words are tokens: text splits on whitespace; decoded words are spelled with a leading space."""

    def __init__(self, vocabulary: dict[str, int], *, chat_template: bool) -> None:
        self.vocabulary = vocabulary
        self.has_chat_template = chat_template

    def id(self, word: str) -> int:
        return self.vocabulary.setdefault(word, len(self.vocabulary))

    def word(self, token_id: int) -> str:
        return next(word for word, i in self.vocabulary.items() if i == token_id)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return [self.id(word) for word in text.split()]

    def decode(self, token_ids: Sequence[int]) -> str:
        return "".join(f" {self.word(t)}" for t in token_ids if t != 0)

    def render_chat(self, messages: Sequence[Mapping[str, str]]) -> str:
        return "".join(f"[{m['role']}] {m['content']}\n" for m in messages) + "[assistant]\n"


class WordEngine:
    """A word-level LM with exact next-word tables: ``table[last word][next word] = p``.

    Text splits on whitespace into words (the tokens); generated words are
    spelled with a leading space. ``default`` is the distribution after a word
    the table does not list. Greedy at temperature 0, seeded sampling otherwise.
    """

    def __init__(
        self,
        table: Mapping[str, Mapping[str, float]],
        *,
        default: Mapping[str, float] | None = None,
        name: str = "words",
        chat_template: bool = True,
        vocabulary: dict[str, int] | None = None,
    ) -> None:
        self.table = {word: dict(row) for word, row in table.items()}
        self.default = dict(default or {EOS: 1.0})
        # Engines given the same vocabulary dict share token ids (like models sharing a tokenizer).
        self.vocabulary = vocabulary if vocabulary is not None else {EOS: 0}
        self.vocabulary.setdefault(EOS, 0)
        self.tokenizer = WordTokenizer(self.vocabulary, chat_template=chat_template)
        self.generate_calls: list[tuple[list[int], SamplingParams]] = []
        self.batch_calls = 0
        tokenizer_id = f"words-{id(self.vocabulary)}"
        self._info = EngineInfo(name, 4096, 20, chat_template, tokenizer_id, frozenset({0}))
        self._id, self._word = self.tokenizer.id, self.tokenizer.word

    @property
    def info(self) -> EngineInfo:
        return self._info

    def distribution(self, last: str) -> dict[str, float]:
        return self.table.get(last, self.default)

    def _record(self, last: str, word: str, k: int) -> TokenLogprob:
        row = self.distribution(last)
        ranked = sorted(row.items(), key=lambda item: -item[1])[: max(k, 1)]
        top = tuple(TopLogprob(self._id(w), f" {w}", math.log(p)) for w, p in ranked)
        return TokenLogprob(self._id(word), f" {word}", math.log(row.get(word, 1e-12)), top)

    async def generate(self, prompt: Prompt, params: SamplingParams) -> Completion:
        ids = self.tokenizer.prompt_ids(prompt)
        self.generate_calls.append((ids, params))
        rng = random.Random(params.seed)
        samples = []
        for index in range(params.n):
            words, records, last, finish = [], [], self._word(ids[-1]) if ids else "", "length"
            for _ in range(params.max_tokens):
                row = self.distribution(last)
                if params.temperature == 0:
                    word = max(row, key=lambda w: row[w])
                else:
                    word = rng.choices(list(row), weights=list(row.values()))[0]
                words.append(word)
                records.append(self._record(last, word, params.logprobs or 1))
                if word == EOS:
                    finish = "stop"
                    break
                last = word
            token_ids = [self._id(w) for w in words]
            text = "".join(f" {w}" for w in words if w != EOS)
            samples.append(Sample(index, text, token_ids, finish, records if params.logprobs is not None else None))
        prompt_logprobs = None
        if params.prompt_logprobs is not None:
            words = [self._word(t) for t in ids]
            prompt_logprobs = [None] + [
                self._record(words[j - 1], words[j], params.prompt_logprobs) for j in range(1, len(words))
            ]
        return Completion(ids, samples, prompt_logprobs)

    async def generate_batch(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[Completion]:
        self.batch_calls += 1
        return [await self.generate(prompt, params) for prompt in prompts]

    async def stream(self, prompt: Prompt, params: SamplingParams) -> AsyncGenerator[SampleDelta, None]:
        completion = await self.generate(prompt, params)
        for sample in completion.samples:
            yield SampleDelta(sample.index, sample.text, sample.token_ids, sample.logprobs, sample.finish_reason)

    async def close(self) -> None:
        return None


def make_pipeline(resources: Resources, limits: Limits | None = None, **libraries: GuidelineLibrary) -> Pipeline:
    """A pipeline over fake resources with the server-wide services (guideline libraries, a grammar store)."""
    return Pipeline(resources, limits or Limits(), Services(GuidelineRetriever(libraries), GrammarService()))
