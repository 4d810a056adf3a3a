"""``POST /v1/completions``."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing

from fastapi import Request
from sse_starlette import EventSourceResponse

from decoding.base import PromptInput
from decoding.pipeline import Candidate, Prepared, details_json
from models.engine import SampleDelta, TokenLogprob
from server.admission import AdmissionTicket
from server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    new_id,
    now,
)
from server.serving import OpenAIServing

LogprobEntry = tuple[str, TokenLogprob | None]


class CompletionHandler(OpenAIServing):
    route = "/v1/completions"

    async def create(
        self, request: CompletionRequest, raw: Request, ticket: AdmissionTicket
    ) -> CompletionResponse | EventSourceResponse:
        prompt = (
            PromptInput(text=request.prompt)
            if isinstance(request.prompt, str)
            else PromptInput(token_ids=list(request.prompt))
        )
        prepared = await self.prepare(
            raw,
            ticket,
            model=request.model,
            prompt=prompt,
            sampling=request.sampling_params(
                logprobs=request.logprobs, prompt_logprobs=request.logprobs if request.echo else None
            ),
            alignment=request.alignment,
            requested_max_tokens=request.max_tokens,
        )
        if request.stream:
            return self.event_stream(raw, self._chunks(request, prepared))
        result = await self.pipeline.run(prepared)
        prefix = await prepared.prompt_text() if request.echo else ""
        prompt_entries = await self._prompt_entries(prepared) if prepared.prompt_logprobs else []
        choices = [self._choice(i, c, prepared, prefix, prompt_entries) for i, c in enumerate(result.choices)]
        return CompletionResponse(
            id=new_id("cmpl"),
            created=now(),
            model=request.model,
            choices=choices,
            usage=self.finish(request.model, prepared, result.choices),
        )

    @staticmethod
    def _choice(
        index: int, candidate: Candidate, prepared: Prepared, prefix: str = "", prompt_entries: Sequence = ()
    ) -> CompletionChoice:
        logprobs = None
        if candidate.logprobs is not None:
            logprobs = completion_logprobs([*prompt_entries, *((r.token, r) for r in candidate.logprobs)])
        return CompletionChoice(
            index=index,
            text=prefix + candidate.text,
            logprobs=logprobs,
            finish_reason=candidate.finish_reason,
            alignment=details_json(candidate) if prepared.request.alignment.return_details else None,
        )

    @staticmethod
    async def _prompt_entries(prepared: Prepared) -> list[LogprobEntry]:
        """(token text, logprob record) per prompt token; the first token has no logprob."""
        entries: list[LogprobEntry] = []
        for token_id, record in zip(prepared.prompt_ids, prepared.prompt_logprobs or [], strict=True):
            entries.append((record.token if record else await prepared.engine.detokenize([token_id]), record))
        return entries

    async def _chunks(self, request: CompletionRequest, prepared: Prepared) -> AsyncGenerator[CompletionResponse, None]:
        response_id, created = new_id("cmpl"), now()

        def chunk(choices: list[CompletionChoice]) -> CompletionResponse:
            return CompletionResponse(id=response_id, created=created, model=request.model, choices=choices)

        async with aclosing(self.stream_events(request.model, prepared)) as events:
            async for event in events:
                if isinstance(event, SampleDelta):
                    yield chunk([self._delta_choice(event)])
                elif isinstance(event, tuple):
                    yield chunk([self._choice(*event, prepared)])
                elif request.stream_options and request.stream_options.include_usage:
                    yield CompletionResponse(id=response_id, created=created, model=request.model, choices=[],
                                             usage=event)  # fmt: skip

    @staticmethod
    def _delta_choice(delta: SampleDelta) -> CompletionChoice:
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
