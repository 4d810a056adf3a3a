"""``POST /v1/chat/completions``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing

from fastapi import Request
from sse_starlette import EventSourceResponse

from models.engine import Engine, SampleDelta, SamplingParams, TokenLogprob
from models.errors import InvalidRequestError
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
from server.serving import OpenAIServing


class ChatCompletionHandler(OpenAIServing):
    route = "/v1/chat/completions"

    async def create(
        self, request: ChatCompletionRequest, raw: Request
    ) -> ChatCompletionResponse | EventSourceResponse:
        engine = self.engine_for(raw, request.model)
        self.check_n(request.n)
        if request.top_logprobs is not None and not request.logprobs:
            raise InvalidRequestError("`top_logprobs` requires `logprobs` to be true.", param="top_logprobs")
        self.check_logprobs(engine, request.top_logprobs, param="top_logprobs")
        prompt = await engine.render_chat([message.to_template() for message in request.messages])
        prompt_ids = await engine.tokenize(prompt, add_special_tokens=False)
        max_tokens = self.max_tokens_for(
            engine,
            len(prompt_ids),
            request.requested_max_tokens,
            prompt_param="messages",
            budget_param="max_completion_tokens" if request.max_completion_tokens else "max_tokens",
        )
        params = request.sampling_params(
            max_tokens=max_tokens, logprobs=(request.top_logprobs or 0) if request.logprobs else None
        )
        if request.stream:
            return self.event_stream(raw, self._chunks(request, engine, prompt_ids, params))
        completion = await engine.generate(prompt_ids, params)
        self.metrics.count_tokens(request.model, prompt=len(prompt_ids), completion=completion.completion_tokens)
        return ChatCompletionResponse(
            id=new_id("chatcmpl"),
            created=now(),
            model=request.model,
            choices=[
                ChatCompletionChoice(
                    index=sample.index,
                    message=ChatMessageOut(content=sample.text),
                    logprobs=chat_logprobs(sample.logprobs),
                    finish_reason=sample.finish_reason,
                )
                for sample in completion.samples
            ],
            usage=Usage.of(len(prompt_ids), completion.completion_tokens),
        )

    async def _chunks(
        self, request: ChatCompletionRequest, engine: Engine, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[ChatCompletionChunk]:
        response_id, created = new_id("chatcmpl"), now()

        def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
            return ChatCompletionChunk(
                id=response_id, created=created, model=request.model, choices=choices, usage=usage
            )

        yield chunk(
            [ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content="")) for i in range(params.n)]
        )
        generated = 0
        async with aclosing(engine.stream(prompt_ids, params)) as deltas:
            async for delta in deltas:
                generated += len(delta.token_ids)
                if delta.text or delta.finish_reason is not None or delta.logprobs is not None:
                    yield chunk([self._choice(delta)])
        self.metrics.count_tokens(request.model, prompt=len(prompt_ids), completion=generated)
        if request.stream_options and request.stream_options.include_usage:
            yield chunk([], Usage.of(len(prompt_ids), generated))

    @staticmethod
    def _choice(delta: SampleDelta) -> ChatChunkChoice:
        return ChatChunkChoice(
            index=delta.index,
            delta=DeltaMessage(content=delta.text) if delta.text else DeltaMessage(),
            logprobs=chat_logprobs(delta.logprobs),
            finish_reason=delta.finish_reason,
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
