"""OpenTelemetry traces of one nudging request, read from the SDK's in-memory exporter: the gateway (in this
process) continues the client's ``traceparent``, each pipeline stage and engine call is a child span with its
model, method, replica and tokens, and the mock vLLM worker receives the engine call's ``traceparent``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from loadtest.mock_vllm import MockWorker
from server.app import build_app
from server.config import Settings

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN_ID = "00f067aa0ba902b7"
NUDGING = {"nudging": {"nudger": "mock-nudger", "gamma": 0.9, "nudge_max_tokens": 2, "base_chunk_tokens": 2}}


@pytest.fixture(scope="module")
def exporter() -> Iterator[InMemorySpanExporter]:
    """The process's tracer provider, exporting to memory (what `tracing.enabled` sets up with OTLP); shut
    down afterwards, so that later tests' spans are not kept."""
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    trace.set_tracer_provider(provider)
    yield spans
    provider.shutdown()


@pytest.fixture
async def gateway(mock: MockWorker, tiny_models: Path) -> AsyncIterator[httpx.AsyncClient]:
    served = {"backend": "vllm", "vllm": {"urls": [mock.url], "served_name": "mock", "grammar_plugin": False}}
    settings = Settings(
        model_root=tiny_models,
        models=[{"name": "mock", "path": "base", **served}, {"name": "mock-nudger", "path": "chat", **served}],
        guidelines={"libraries": []},
    )
    app = build_app(settings)
    async with app.router.lifespan_context(app):
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway", timeout=60)
        async with client:
            for _ in range(600):
                if (await client.get("/ready")).status_code == 200:
                    break
                await asyncio.sleep(0.05)
            yield client


def children(spans: list[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    assert parent.context is not None
    return [span for span in spans if span.parent is not None and span.parent.span_id == parent.context.span_id]


async def test_one_nudging_request_is_one_trace_from_the_client_to_the_worker(
    exporter: InMemorySpanExporter, gateway: httpx.AsyncClient, mock: MockWorker
):
    exporter.clear()
    body: dict[str, Any] = {"model": "mock", "prompt": "Hello there", "max_tokens": 6, "alignment": NUDGING}
    traceparent = f"00-{TRACE_ID}-{CLIENT_SPAN_ID}-01"
    response = await gateway.post("/v1/completions", json=body, headers={"traceparent": traceparent})
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    spans = [span for span in exporter.get_finished_spans() if f"{span.context.trace_id:032x}" == TRACE_ID]

    (root,) = [span for span in spans if span.name == "POST /v1/completions"]
    assert root.parent is not None and f"{root.parent.span_id:016x}" == CLIENT_SPAN_ID  # the client's trace
    assert root.attributes is not None and root.attributes["http.response.status_code"] == 200
    stages = {span.name: span for span in children(spans, root)}
    assert set(stages) == {"alignd.prepare nudging", "alignd.strategy nudging"}

    engine_calls = children(spans, stages["alignd.strategy nudging"])
    assert len(engine_calls) >= 2 and usage["completion_tokens"] > 0
    models = set()
    for span in engine_calls:
        attributes = dict(span.attributes or {})
        assert span.name.startswith("alignd.engine ")
        assert attributes["alignd.method"] == "nudging" and attributes["alignd.replica"] == mock.url
        assert attributes["alignd.prompt_tokens"] > 0
        models.add(attributes["alignd.model"])
    assert models == {"mock", "mock-nudger"}, "both the base's and the nudger's calls"
    completion_tokens = sum(dict(span.attributes or {})["alignd.completion_tokens"] for span in engine_calls)
    assert completion_tokens == usage["completion_tokens"]

    sent = [header for header in mock.stats()["traceparents"] if header.split("-")[1] == TRACE_ID]
    engine_span_ids = {f"{span.context.span_id:016x}" for span in engine_calls}
    assert len(sent) == len(engine_calls) and {header.split("-")[2] for header in sent} == engine_span_ids
