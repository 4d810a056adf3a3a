"""``POST /v1/chat/completions``."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing

from fastapi import Request
from starlette.responses import StreamingResponse

from decoding.base import Candidate
from decoding.events import ChoiceFinished, StreamEvent, TextDelta
from decoding.pipeline import Prepared, details_json
from models.engine import TokenLogprob
from server.admission import AdmissionTicket
from server.protocol import (
    ChatChoiceLogprobs,
    ChatChunkChoice,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    ChatTokenLogprob,
    DeltaMessage,
    TopLogprobOut,
    Usage,
    new_id,
    now,
)
from server.serving import Chunk, OpenAIServing


class ChatCompletionHandler(OpenAIServing):
    route = "/v1/chat/completions"

    async def create(
        self, request: ChatCompletionRequest, raw: Request, ticket: AdmissionTicket
    ) -> ChatCompletionResponse | StreamingResponse:
        prepared = await self.prepare(raw, ticket, request)
        if request.stream:
            envelope = ChatCompletionChunk(id=new_id("chatcmpl"), created=now(), model=request.model, choices=[])
            events = await self.started_events(request.model, prepared)
            return self.event_stream(raw, envelope, self._chunks(request, prepared, envelope, events))
        result = await self.pipeline.run(prepared)
        return ChatCompletionResponse(
            id=new_id("chatcmpl"),
            created=now(),
            model=request.model,
            choices=[self._choice(i, c, prepared) for i, c in enumerate(result.choices)],
            usage=self.finish(request.model, prepared, result.choices),
        )

    @staticmethod
    def _choice(index: int, candidate: Candidate, prepared: Prepared) -> ChatCompletionChoice:
        return ChatCompletionChoice(
            index=index,
            message=ChatMessageOut(content=candidate.text),
            logprobs=chat_logprobs(candidate.logprobs),
            finish_reason=candidate.finish_reason,
            alignment=details_json(candidate) if prepared.request.alignment.return_details else None,
        )

    async def _chunks(
        self,
        request: ChatCompletionRequest,
        prepared: Prepared,
        envelope: ChatCompletionChunk,
        events: AsyncGenerator[StreamEvent | Usage, None],
    ) -> AsyncGenerator[Chunk, None]:
        yield [ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content="")) for i in range(request.n)]
        async with aclosing(events) as started:
            async for event in started:
                match event:
                    case TextDelta(index=index, text=text, logprobs=logprobs):
                        delta = DeltaMessage(content=text) if text else DeltaMessage()
                        yield [ChatChunkChoice(index=index, delta=delta, logprobs=chat_logprobs(logprobs))]
                    case ChoiceFinished(index=index, candidate=candidate):
                        yield [self._finish_chunk(index, candidate, prepared)]
                    case Usage() if request.stream_options and request.stream_options.include_usage:
                        yield envelope.model_copy(update={"usage": event})

    @staticmethod
    def _finish_chunk(index: int, candidate: Candidate, prepared: Prepared) -> ChatChunkChoice:
        """A choice's last chunk, as OpenAI sends it: an empty delta with the finish reason (and our details)."""
        return ChatChunkChoice(
            index=index,
            delta=DeltaMessage(),
            finish_reason=candidate.finish_reason,
            alignment=details_json(candidate) if prepared.request.alignment.return_details else None,
        )


def chat_logprobs(records: Sequence[TokenLogprob] | None) -> ChatChoiceLogprobs | None:
    if records is None:
        return None
    return ChatChoiceLogprobs(
        content=[
            ChatTokenLogprob(
                token=record.token,
                logprob=record.logprob,
                bytes=list(record.token.encode()),
                top_logprobs=[
                    TopLogprobOut(token=top.token, logprob=top.logprob, bytes=list(top.token.encode()))
                    for top in record.top
                ],
            )
            for record in records
        ]
    )
