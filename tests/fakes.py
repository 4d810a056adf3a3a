"""Scripted engines and scorers with exact distributions, for unit tests of the methods."""

from __future__ import annotations

import random
from collections.abc import AsyncGenerator, Mapping, Sequence

from models.engine import Completion, EngineInfo, Prompt, Sample, SampleDelta, SamplingParams
from models.errors import InvalidRequestError, ModelNotFoundError
from models.scorers import Scorer


class CategoricalEngine:
    """Each sample is one whole answer drawn from a fixed categorical distribution.

    Tokens are characters (``ord``), so prompts and answers round-trip exactly.
    """

    def __init__(self, answers: Mapping[str, float], *, name: str = "fake", max_model_len: int = 4096) -> None:
        self.answers = list(answers)
        self.weights = list(answers.values())
        self.calls: list[SamplingParams] = []
        self._info = EngineInfo(name, max_model_len, 20, True, "chars")

    @property
    def info(self) -> EngineInfo:
        return self._info

    async def tokenize(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]

    async def detokenize(self, token_ids: Sequence[int]) -> str:
        return "".join(chr(t) for t in token_ids)

    async def render_chat(self, messages: Sequence[Mapping[str, str]]) -> str:
        return "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>"

    def _samples(self, params: SamplingParams) -> list[Sample]:
        self.calls.append(params)
        rng = random.Random(params.seed)
        texts = rng.choices(self.answers, weights=self.weights, k=params.n)
        return [Sample(i, text, [ord(c) for c in text], "stop") for i, text in enumerate(texts)]

    async def generate(self, prompt: Prompt, params: SamplingParams) -> Completion:
        ids = await self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        return Completion(ids, self._samples(params))

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
            raise ModelNotFoundError(name)
        return self.engines[name]

    def scorer(self, name: str, *, param: str) -> Scorer:
        if name not in self.scorers:
            raise InvalidRequestError(f"`{name}` is not a configured reward scorer.", param=param)
        return self.scorers[name]
