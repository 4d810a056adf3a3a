"""``POST /v1/completions``."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing

from fastapi import Request
from starlette.responses import StreamingResponse

from decoding.base import Candidate
from decoding.events import ChoiceFinished, StreamEvent, TextDelta
from decoding.pipeline import PipelineResult, Prepared, details_json
from models.engine import TokenLogprob
from server.admission import AdmissionTicket
from server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Usage,
    new_id,
    now,
)
from server.serving import Chunk, OpenAIServing

LogprobEntry = tuple[str, TokenLogprob | None]


class CompletionHandler(OpenAIServing):
    route = "/v1/completions"

    async def create(
        self, request: CompletionRequest, raw: Request, ticket: AdmissionTicket
    ) -> CompletionResponse | StreamingResponse:
        prepared = await self.prepare(raw, ticket, request)
        if request.stream:
            envelope = CompletionResponse(id=new_id("cmpl"), created=now(), model=request.model, choices=[])
            events = await self.started_events(request.model, prepared)
            return self.event_stream(raw, envelope, self._chunks(request, prepared, envelope, events))
        result = await self.pipeline.run(prepared)
        prefix = prepared.job.prompt_text if request.echo else ""
        prompt_entries = self._prompt_entries(prepared, result) if result.prompt_logprobs else []
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
    def _prompt_entries(prepared: Prepared, result: PipelineResult) -> list[LogprobEntry]:
        """(token text, logprob record) per prompt token; the first token has no logprob."""
        decode = prepared.job.engine.tokenizer.decode
        return [
            (record.token if record else decode([token_id]), record)
            for token_id, record in zip(result.prompt_ids, result.prompt_logprobs or [], strict=True)
        ]

    async def _chunks(
        self,
        request: CompletionRequest,
        prepared: Prepared,
        envelope: CompletionResponse,
        events: AsyncGenerator[StreamEvent | Usage, None],
    ) -> AsyncGenerator[Chunk, None]:
        async with aclosing(events) as started:
            async for event in started:
                match event:
                    case TextDelta(index=index, text=text, logprobs=records):
                        logprobs = None if records is None else completion_logprobs([(r.token, r) for r in records])
                        yield [CompletionChoice(index=index, text=text, logprobs=logprobs)]
                    case ChoiceFinished(index=index, candidate=candidate):
                        yield [self._finish_choice(index, candidate, prepared)]
                    case Usage() if request.stream_options and request.stream_options.include_usage:
                        yield envelope.model_copy(update={"usage": event})

    @staticmethod
    def _finish_choice(index: int, candidate: Candidate, prepared: Prepared) -> CompletionChoice:
        return CompletionChoice(
            index=index,
            text="",
            finish_reason=candidate.finish_reason,
            alignment=details_json(candidate) if prepared.request.alignment.return_details else None,
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
