"""What both generation handlers share: model lookup, request limits, SSE framing."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator

from fastapi import Request
from pydantic import BaseModel
from sse_starlette import EventSourceResponse

from models.engine import Engine
from models.errors import ContextLengthExceededError, InvalidRequestError
from server.config import LimitsConfig
from server.engines import ModelRegistry
from server.errors import as_aligned_error, error_payload
from server.metrics import Metrics

logger = logging.getLogger(__name__)

DONE = "[DONE]"


class OpenAIServing:
    """Base of the endpoint handlers; built once per app with its dependencies."""

    route: str = ""

    def __init__(self, registry: ModelRegistry, limits: LimitsConfig, metrics: Metrics) -> None:
        self.registry = registry
        self.limits = limits
        self.metrics = metrics

    def engine_for(self, request: Request, model: str) -> Engine:
        engine = self.registry.get(model)
        request.state.model = model
        return engine

    def check_n(self, n: int) -> None:
        if n > self.limits.max_n:
            raise InvalidRequestError(f"`n` must be between 1 and {self.limits.max_n}, got {n}.", param="n")

    def check_logprobs(self, engine: Engine, k: int | None, *, param: str) -> None:
        limit = min(self.limits.max_logprobs, engine.info.max_logprobs)
        if k is not None and k > limit:
            raise InvalidRequestError(f"`{param}` must be between 0 and {limit}, got {k}.", param=param)

    def max_tokens_for(
        self,
        engine: Engine,
        prompt_tokens: int,
        requested: int | None,
        *,
        prompt_param: str,
        budget_param: str = "max_tokens",
    ) -> int:
        """The token budget, checked against the context: the request's, else what is left (capped)."""
        context = engine.info.max_model_len
        if prompt_tokens >= context:
            raise ContextLengthExceededError(
                f"This model's maximum context length is {context} tokens, but the prompt has {prompt_tokens} tokens.",
                param=prompt_param,
            )
        if requested is None:
            return min(self.limits.default_max_tokens, context - prompt_tokens)
        if prompt_tokens + requested > context:
            raise ContextLengthExceededError(
                f"This model's maximum context length is {context} tokens; the prompt has {prompt_tokens} "
                f"tokens and `{budget_param}` asks for {requested}. Lower `{budget_param}` to at most "
                f"{context - prompt_tokens}.",
                param=budget_param,
            )
        return requested

    def event_stream(self, request: Request, chunks: AsyncIterator[BaseModel]) -> EventSourceResponse:
        """SSE in OpenAI's framing: ``data: {json}`` per chunk, an error chunk on failure, then ``[DONE]``."""
        model = getattr(request.state, "model", "")
        started = time.perf_counter()

        async def events() -> AsyncIterator[dict[str, str]]:
            first = True
            try:
                async for chunk in chunks:
                    if first:
                        self.metrics.time_to_first_token.labels(route=self.route, model=model).observe(
                            time.perf_counter() - started
                        )
                        first = False
                    yield {"data": chunk.model_dump_json()}
            except Exception as exc:
                error = as_aligned_error(exc)
                self.metrics.errors.labels(route=self.route, model=model, type=error.error_type).inc()
                yield {"data": json.dumps(error_payload(error))}
            yield {"data": DONE}

        return EventSourceResponse(events(), sep="\n")
