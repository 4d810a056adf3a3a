"""What both generation handlers share: profiles, the pipeline, request limits, SSE framing."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import replace
from typing import TypeVar

import orjson
from fastapi import Request
from pydantic import BaseModel
from starlette.responses import StreamingResponse

from decoding.alignment import parse_alignment
from decoding.base import Candidate, Limits
from decoding.events import ChoiceFinished, StreamEvent
from decoding.pipeline import AlignedRequest, Pipeline, Prepared
from decoding.uncertainty import AbstainParams
from models.engine import Engine
from models.errors import InvalidRequestError, ModelNotFoundError, WorkBudgetExceededError
from server.admission import AdmissionTicket
from server.auth import caller, charge, check_methods, check_model
from server.engines import ModelRegistry, UsableResources
from server.errors import as_aligned_error, error_payload
from server.metrics import Metrics
from server.protocol import AlignmentUsage, ChatCompletionRequest, CompletionRequest, ModelTokens, Usage

T = TypeVar("T")

logger = logging.getLogger(__name__)


def sse_event(data: bytes) -> bytes:
    """One server-sent event carrying ``data``."""
    return b"data: " + data + b"\n\n"


DONE = sse_event(b"[DONE]")
# No caching, and no buffering by proxies such as nginx: each chunk goes out as it is made.
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}

Chunk = Sequence[BaseModel] | BaseModel
"""What a stream's generator yields: one chunk's choices (framed by the stream's envelope), or a whole chunk."""


class ChunkFrame:
    """The chunks of one stream differ only in their choices, so the envelope (id, object, created, model, and
    what follows the choices) is serialised once; each chunk then costs only its choices' serialisation, and
    its bytes are exactly what serialising the whole chunk model would give."""

    _CHOICES = b'"choices":[]'

    def __init__(self, envelope: BaseModel) -> None:
        head, marker, tail = envelope.model_dump_json().encode().partition(self._CHOICES)
        if not marker:
            raise ValueError(f"{type(envelope).__name__} must be built with empty choices")
        self._head = head + b'"choices":['
        self._tail = b"]" + tail

    def event(self, chunk: Chunk) -> bytes:
        if isinstance(chunk, BaseModel):
            return sse_event(chunk.model_dump_json().encode())
        return sse_event(self._head + b",".join(choice.model_dump_json().encode() for choice in chunk) + self._tail)


class OpenAIServing:
    """Base of the endpoint handlers; built once per app with its dependencies."""

    route: str = ""

    def __init__(
        self,
        registry: ModelRegistry,
        pipeline: Pipeline,
        limits: Limits,
        metrics: Metrics,
    ) -> None:
        self.registry = registry
        self.pipeline = pipeline
        self.limits = limits
        self.metrics = metrics

    async def prepare(
        self, raw: Request, ticket: AdmissionTicket, request: CompletionRequest | ChatCompletionRequest
    ) -> Prepared:
        """Resolves the model (or profile) and checks the request's own fields; then waits for an admission
        slot of the model, and validates limits, alignment and the compute budget while running the prompt
        stage. Cheap checks come first so bad input is refused without queueing."""
        key = caller(raw)
        if key is not None:
            check_model(key, request.model)
        engine, profile = self.registry.resolve(request.model)
        raw.state.model = request.model
        sampling = request.sampling_params()
        self._check_n(sampling.n)
        self._check_logprobs(engine, sampling.logprobs, param=request.logprobs_param)
        alignment = parse_alignment(request.alignment_object(), profile.alignment if profile else None)
        usable = None
        if key is not None:
            check_methods(key, alignment.methods)
            usable = None if key.models is None else self.registry.usable_by(key.models, request.model)
        aligned = AlignedRequest(
            engine=engine,
            prompt=request.prompt_input(),
            sampling=sampling,
            alignment=alignment,
            requested_max_tokens=request.requested_max_tokens,
            budget_param=request.budget_param,
            resources=usable,
        )
        aligned.fallback = self._fallback(aligned, request.logprobs_param, usable)
        await ticket.admit(engine.info.name)
        try:
            prepared = await self.pipeline.prepare(aligned)
        except WorkBudgetExceededError:
            self.metrics.admission_rejected.labels(model=engine.info.name, reason="work_budget").inc()
            raise
        except InvalidRequestError as exc:
            # A grammar sent as `response_format` is refused in its own name.
            if request.grammar_param and exc.param and exc.param.startswith("alignment.grammar"):
                exc.param = request.grammar_param
            raise
        if key is not None:
            await charge(raw, key, prepared)
        self.metrics.request_work.labels(model=engine.info.name).observe(prepared.work)
        return prepared

    def _fallback(
        self, aligned: AlignedRequest, logprobs_param: str, usable: UsableResources | None
    ) -> AlignedRequest | None:
        """The request as ``abstain.fallback`` names it: that profile's model and alignment, the request's prompt
        and sampling. It runs under the request's admission slot, as a nudger does."""
        abstain = aligned.alignment.methods.get("abstain")
        if not isinstance(abstain, AbstainParams) or abstain.fallback is None:
            return None
        name = abstain.fallback
        param = "alignment.abstain.fallback"
        unknown = InvalidRequestError(f"`{name}` is not a served model or profile.", param=param)
        if usable is not None and name not in usable.names:  # refused as if it did not exist
            raise unknown
        try:
            engine, profile = self.registry.resolve(name)
        except ModelNotFoundError as exc:
            raise unknown from exc
        alignment = parse_alignment(None, profile.alignment if profile else None)
        own = alignment.methods.get("abstain")
        if isinstance(own, AbstainParams) and own.fallback is not None:
            raise InvalidRequestError(f"The fallback `{name}` falls back itself; a fallback may not.", param=param)
        self._check_logprobs(engine, aligned.sampling.logprobs, param=logprobs_param)
        details = aligned.alignment.return_details
        return replace(aligned, engine=engine, alignment=replace(alignment, return_details=details))

    def _check_n(self, n: int) -> None:
        if n > self.limits.max_n:
            raise InvalidRequestError(f"`n` must be between 1 and {self.limits.max_n}, got {n}.", param="n")

    def _check_logprobs(self, engine: Engine, k: int | None, *, param: str) -> None:
        limit = min(self.limits.max_logprobs, engine.info.max_logprobs)
        if k is not None and k > limit:
            raise InvalidRequestError(f"`{param}` must be between 0 and {limit}, got {k}.", param=param)

    def finish(self, model: str, prepared: Prepared, choices: Sequence[Candidate] = ()) -> Usage:
        """The request's cost over every model it touched; it and what the methods did go into the metrics."""
        meter = prepared.meter
        for name, usage in meter.by_model.items():
            self.metrics.count_tokens(name, prompt=usage.prompt_tokens, completion=usage.completion_tokens)
        self.metrics.record_alignment(
            model, prepared.request.alignment.methods, meter.engine_calls, (choice.details for choice in choices)
        )
        alignment = None
        if prepared.request.alignment.return_details:
            models = {name: ModelTokens(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens)
                      for name, u in meter.by_model.items()}  # fmt: skip
            alignment = AlignmentUsage(engine_calls=meter.engine_calls, reward_calls=meter.reward_calls, models=models)
        return Usage.of(meter.prompt_tokens, meter.completion_tokens, alignment)

    async def started_events(self, model: str, prepared: Prepared) -> AsyncGenerator[StreamEvent | Usage, None]:
        """``stream_events`` with its first event already received, before the response's 200 is sent: a
        request that fails before it produces anything (no healthy replica, a worker that refuses it) gets
        its error status, as unstreamed, not a 200 and an error event."""
        events = self.stream_events(model, prepared)
        try:
            first = await anext(events)
        except BaseException:
            await events.aclose()
            raise
        return _prepended(first, events)

    async def stream_events(self, model: str, prepared: Prepared) -> AsyncGenerator[StreamEvent | Usage, None]:
        """What a stream shows, in order: the pipeline's events, then the request's usage."""
        finished: list[Candidate] = []
        async with aclosing(self.pipeline.stream(prepared)) as events:
            async for event in events:
                if isinstance(event, ChoiceFinished):
                    finished.append(event.candidate)
                yield event
        yield self.finish(model, prepared, finished)

    def event_stream(
        self, request: Request, envelope: BaseModel, chunks: AsyncGenerator[Chunk, None]
    ) -> StreamingResponse:
        """SSE in OpenAI's framing: ``data: {json}`` per chunk, an error chunk on failure, then ``[DONE]``.

        Starlette cancels the stream when the client disconnects, which closes ``chunks`` and, through them,
        the engine calls (a vLLM worker aborts the request when its connection closes)."""
        model = getattr(request.state, "model", "")
        started: float = request.state.started_s  # from the request's arrival, waits for the first event included
        frame = ChunkFrame(envelope)

        async def events() -> AsyncIterator[bytes]:
            first = True
            try:
                async with aclosing(chunks) as items:
                    async for chunk in items:
                        if first:
                            self.metrics.time_to_first_token.labels(route=self.route, model=model).observe(
                                time.perf_counter() - started
                            )
                            first = False
                        yield frame.event(chunk)
            except Exception as exc:
                error = as_aligned_error(exc)
                self.metrics.errors.labels(route=self.route, model=model, type=error.error_type).inc()
                yield sse_event(orjson.dumps(error_payload(error)))
            yield DONE

        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


async def _prepended(first: T, rest: AsyncGenerator[T, None]) -> AsyncGenerator[T, None]:
    yield first
    async with aclosing(rest) as items:
        async for item in items:
            yield item
