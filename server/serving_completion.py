"""``POST /v1/completions``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing

from fastapi import Request
from sse_starlette import EventSourceResponse

from models.engine import Completion, Engine, SampleDelta, SamplingParams, TokenLogprob
from server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Usage,
    new_id,
    now,
)
from server.serving import OpenAIServing

LogprobEntry = tuple[str, TokenLogprob | None]


class CompletionHandler(OpenAIServing):
    route = "/v1/completions"

    async def create(self, request: CompletionRequest, raw: Request) -> CompletionResponse | EventSourceResponse:
        engine = self.engine_for(raw, request.model)
        self.check_n(request.n)
        self.check_logprobs(engine, request.logprobs, param="logprobs")
        if isinstance(request.prompt, str):
            prompt_ids = await engine.tokenize(request.prompt)
        else:
            prompt_ids = list(request.prompt)
        max_tokens = self.max_tokens_for(engine, len(prompt_ids), request.max_tokens, prompt_param="prompt")
        params = request.sampling_params(
            max_tokens=max_tokens,
            logprobs=request.logprobs,
            prompt_logprobs=request.logprobs if request.echo else None,
        )
        if request.stream:
            return self.event_stream(raw, self._chunks(request, engine, prompt_ids, params))
        completion = await engine.generate(prompt_ids, params)
        self.metrics.count_tokens(request.model, prompt=len(prompt_ids), completion=completion.completion_tokens)
        return await self._response(request, engine, completion)

    async def _response(self, request: CompletionRequest, engine: Engine, completion: Completion) -> CompletionResponse:
        prefix = await engine.detokenize(completion.prompt_token_ids) if request.echo else ""
        prompt_entries = await self._prompt_entries(engine, completion) if completion.prompt_logprobs else []
        choices = []
        for sample in completion.samples:
            logprobs = None
            if sample.logprobs is not None:
                logprobs = completion_logprobs([*prompt_entries, *((r.token, r) for r in sample.logprobs)])
            choices.append(
                CompletionChoice(
                    index=sample.index, text=prefix + sample.text, logprobs=logprobs, finish_reason=sample.finish_reason
                )
            )
        return CompletionResponse(
            id=new_id("cmpl"),
            created=now(),
            model=request.model,
            choices=choices,
            usage=Usage.of(len(completion.prompt_token_ids), completion.completion_tokens),
        )

    async def _prompt_entries(self, engine: Engine, completion: Completion) -> list[LogprobEntry]:
        """(token text, logprob record) per prompt token; the first token has no logprob."""
        entries: list[LogprobEntry] = []
        for token_id, record in zip(completion.prompt_token_ids, completion.prompt_logprobs or [], strict=True):
            entries.append((record.token if record else await engine.detokenize([token_id]), record))
        return entries

    async def _chunks(
        self, request: CompletionRequest, engine: Engine, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[CompletionResponse]:
        response_id, created = new_id("cmpl"), now()
        generated = 0
        async with aclosing(engine.stream(prompt_ids, params)) as deltas:
            async for delta in deltas:
                generated += len(delta.token_ids)
                if not delta.text and delta.finish_reason is None and delta.logprobs is None:
                    continue
                yield CompletionResponse(
                    id=response_id, created=created, model=request.model, choices=[self._choice(delta)]
                )
        self.metrics.count_tokens(request.model, prompt=len(prompt_ids), completion=generated)
        if request.stream_options and request.stream_options.include_usage:
            yield CompletionResponse(
                id=response_id, created=created, model=request.model, choices=[],
                usage=Usage.of(len(prompt_ids), generated),
            )  # fmt: skip

    @staticmethod
    def _choice(delta: SampleDelta) -> CompletionChoice:
        logprobs = None if delta.logprobs is None else completion_logprobs([(r.token, r) for r in delta.logprobs])
        return CompletionChoice(
            index=delta.index, text=delta.text, logprobs=logprobs, finish_reason=delta.finish_reason
        )


def completion_logprobs(entries: Sequence[LogprobEntry]) -> CompletionLogprobs:
    """The legacy completions logprobs object; a token without a record reports ``null``."""
    result = CompletionLogprobs()
    offset = 0
    for token, record in entries:
        result.tokens.append(token)
        result.token_logprobs.append(None if record is None else record.logprob)
        result.top_logprobs.append(None if record is None else {top.token: top.logprob for top in record.top})
        result.text_offset.append(offset)
        offset += len(token)
    return result
