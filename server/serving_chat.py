"""``POST /v1/chat/completions``."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing

from fastapi import Request
from sse_starlette import EventSourceResponse

from decoding.base import PromptInput
from decoding.pipeline import Candidate, Prepared, details_json
from models.engine import SampleDelta, TokenLogprob
from models.errors import InvalidRequestError
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
    new_id,
    now,
)
from server.serving import OpenAIServing


class ChatCompletionHandler(OpenAIServing):
    route = "/v1/chat/completions"

    async def create(
        self, request: ChatCompletionRequest, raw: Request, ticket: AdmissionTicket
    ) -> ChatCompletionResponse | EventSourceResponse:
        if request.top_logprobs is not None and not request.logprobs:
            raise InvalidRequestError("`top_logprobs` requires `logprobs` to be true.", param="top_logprobs")
        prepared = await self.prepare(
            raw,
            ticket,
            model=request.model,
            prompt=PromptInput(messages=[message.to_template() for message in request.messages]),
            sampling=request.sampling_params(logprobs=(request.top_logprobs or 0) if request.logprobs else None),
            alignment=request.alignment_with_response_format(),
            requested_max_tokens=request.requested_max_tokens,
            budget_param="max_completion_tokens" if request.max_completion_tokens else "max_tokens",
            logprobs_param="top_logprobs",
        )
        if request.stream:
            return self.event_stream(raw, self._chunks(request, prepared))
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
        self, request: ChatCompletionRequest, prepared: Prepared
    ) -> AsyncGenerator[ChatCompletionChunk, None]:
        response_id, created = new_id("chatcmpl"), now()

        def chunk(choices: list[ChatChunkChoice]) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=response_id, created=created, model=request.model, choices=choices)

        yield chunk(
            [ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content="")) for i in range(request.n)]
        )
        async with aclosing(self.stream_events(request.model, prepared)) as events:
            async for event in events:
                if isinstance(event, SampleDelta):
                    yield chunk([self._delta_chunk(event)])
                elif isinstance(event, tuple):
                    yield chunk([self._final_chunk(*event, prepared)])
                elif request.stream_options and request.stream_options.include_usage:
                    yield ChatCompletionChunk(id=response_id, created=created, model=request.model, choices=[],
                                              usage=event)  # fmt: skip

    @staticmethod
    def _delta_chunk(delta: SampleDelta) -> ChatChunkChoice:
        return ChatChunkChoice(
            index=delta.index,
            delta=DeltaMessage(content=delta.text) if delta.text else DeltaMessage(),
            logprobs=chat_logprobs(delta.logprobs),
            finish_reason=delta.finish_reason,
        )

    @staticmethod
    def _final_chunk(index: int, candidate: Candidate, prepared: Prepared) -> ChatChunkChoice:
        """A selected answer arrives whole, in one chunk."""
        return ChatChunkChoice(
            index=index,
            delta=DeltaMessage(content=candidate.text),
            logprobs=chat_logprobs(candidate.logprobs),
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
