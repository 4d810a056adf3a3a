"""Spans of the pipeline: one per stage a request runs (``alignd.<stage> <method>``) and one per engine call
(``alignd.engine <call>``, with the model, the method whose stage made it, and its tokens).

Only OpenTelemetry's API is used here: without a configured SDK (``tracing`` in the server's config) every
span is a no-op. The HTTP layers add the request's span above these and the replica below them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from opentelemetry import trace

tracer = trace.get_tracer("alignd.decoding")

_method: ContextVar[str] = ContextVar("alignd_method", default="plain")


@contextmanager
def stage_span(stage: str, method: str) -> Iterator[trace.Span]:
    """A span for one stage of a request; the engine calls made inside are attributed to ``method``."""
    token = _method.set(method)
    try:
        attributes = {"alignd.stage": stage, "alignd.method": method}
        with tracer.start_as_current_span(f"alignd.{stage} {method}", attributes=attributes) as span:
            yield span
    finally:
        _method.reset(token)


def engine_span(call: str, model: str) -> trace.Span:
    """A started (not current) span for one engine call; the caller makes it current and ends it."""
    return tracer.start_span(
        f"alignd.engine {call}", attributes={"alignd.model": model, "alignd.method": _method.get()}
    )


def record_tokens(span: trace.Span, prompt: int, completion: int) -> None:
    span.set_attribute("alignd.prompt_tokens", prompt)
    span.set_attribute("alignd.completion_tokens", completion)
