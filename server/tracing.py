"""OpenTelemetry tracing: a span per client request, above the pipeline's stage and engine-call spans.

The request's span continues a client's W3C ``traceparent`` and is the parent of every engine call, whose
``traceparent`` goes on to the vLLM workers (``models.worker_http``), so a trace runs from the client through
the gateway into vLLM. With ``tracing.enabled`` spans are batched to an OTLP/HTTP collector; without it no SDK
is installed and every span is a no-op.
"""

from __future__ import annotations

from opentelemetry import propagate, trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, Status, StatusCode
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.config import TracingConfig
from server.logs import request_id

tracer = trace.get_tracer("alignd.server")


def configure_tracing(config: TracingConfig) -> TracerProvider | None:
    """Installs the SDK with an OTLP exporter when tracing is on; the provider, to shut down at exit."""
    if not config.enabled:
        return None
    provider = TracerProvider(
        resource=Resource.create({"service.name": config.service_name}),
        sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)),
    )
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=config.endpoint)))
    trace.set_tracer_provider(provider)
    return provider


class TracingMiddleware:
    """One server span per HTTP request, current while it is served (a stream's included)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
        attributes = {"http.request.method": scope["method"], "url.path": scope["path"],
                      "alignd.request_id": request_id.get() or ""}  # fmt: skip
        with tracer.start_as_current_span(
            f"{scope['method']} {scope['path']}", context=propagate.extract(headers), kind=SpanKind.SERVER,
            attributes=attributes,
        ) as span:  # fmt: skip

            async def send_traced(message: Message) -> None:
                if message["type"] == "http.response.start":
                    status = message["status"]
                    span.set_attribute("http.response.status_code", status)
                    if status >= 500:
                        span.set_status(Status(StatusCode.ERROR))
                await send(message)

            await self.app(scope, receive, send_traced)
