"""The plain strategy: one engine call samples all ``n`` answers (logits processors run inside it)."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field

from decoding.base import Candidate, Generation, GenerationJob, MethodParams, PromptInput, with_n
from decoding.events import ChoiceFinished, StreamEvent, TextDelta
from models.engine import Engine, Sample, SampleDelta, TokenLogprob


class PlainStrategy:
    """Chat prompts through the model's own template; completions prompts as given."""

    def __init__(self, params: MethodParams | None = None) -> None:
        self.params = params

    def render(self, base: Engine, prompt: PromptInput) -> str | None:
        if prompt.messages is not None:
            return base.tokenizer.render_chat(prompt.messages)
        return prompt.text

    def check(self, job: GenerationJob) -> None:
        return None

    def work(self, job: GenerationJob) -> int:
        return 0

    async def generate(self, job: GenerationJob, n: int) -> Generation:
        completion = await job.engine.generate(job.prompt_ids, with_n(job.sampling, n))
        return Generation([candidate_of(sample) for sample in completion.samples], completion.prompt_logprobs)

    async def stream(self, job: GenerationJob) -> AsyncGenerator[StreamEvent, None]:
        """The ``n`` answers token by token; each ends with the same candidate ``generate`` returns."""
        samples: dict[int, _StreamedSample] = {}
        async with aclosing(job.engine.stream(job.prompt_ids, job.sampling)) as deltas:
            async for delta in deltas:
                sample = samples.setdefault(delta.index, _StreamedSample(delta.index))
                sample.add(delta)
                if delta.text or delta.logprobs:
                    yield TextDelta(delta.index, delta.text, delta.logprobs)
                if delta.finish_reason is not None:
                    yield ChoiceFinished(delta.index, candidate_of(sample.finished(delta)))


def candidate_of(sample: Sample) -> Candidate:
    return Candidate(sample.text, sample.token_ids, sample.finish_reason, sample.logprobs)


@dataclass(slots=True)
class _StreamedSample:
    """One sample assembled from its deltas."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None

    def add(self, delta: SampleDelta) -> None:
        self.text += delta.text
        self.token_ids += delta.token_ids
        if delta.logprobs is not None:
            self.logprobs = [*(self.logprobs or []), *delta.logprobs]

    def finished(self, last: SampleDelta) -> Sample:
        assert last.finish_reason is not None
        return Sample(self.index, self.text, self.token_ids, last.finish_reason, self.logprobs)
