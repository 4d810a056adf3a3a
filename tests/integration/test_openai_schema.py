"""Every response shape validates against OpenAI's published schema (``tests/openai_spec.py``), so strictly
typed clients (other languages' SDKs, schema validators) accept alignd's answers."""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import pytest

from evaluation.gateway import LocalGateway
from tests.openai_spec import schema

CHAT = [{"role": "user", "content": "Say hello."}]
DETAILS = {"best_of_n": {"n": 2, "reward": "rm"}, "return_details": True}


def validate(instance: Any, name: str) -> None:
    jsonschema.Draft202012Validator(schema(name)).validate(instance)


def stream_chunks(server: LocalGateway, route: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    chunks = []
    with httpx.stream("POST", f"{server.url}/v1/{route}", json={**body, "stream": True}, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line.removeprefix("data: ")))
    return chunks


CHAT_BODIES = {
    "plain": {"model": "tiny-chat", "messages": CHAT, "max_tokens": 6},
    "n-logprobs": {"model": "tiny-chat", "messages": CHAT, "max_tokens": 6, "n": 3, "logprobs": True,
                   "top_logprobs": 2},
    "aligned": {"model": "tiny-chat", "messages": CHAT, "max_tokens": 6, "alignment": DETAILS},
}  # fmt: skip
COMPLETION_BODIES = {
    "plain": {"model": "tiny-base", "prompt": "def f():", "max_tokens": 6},
    "n-logprobs-echo": {"model": "tiny-base", "prompt": "def f():", "max_tokens": 6, "n": 3, "logprobs": 2,
                        "echo": True},
    "aligned": {"model": "tiny-base", "prompt": "def f():", "max_tokens": 6, "alignment": DETAILS},
}  # fmt: skip


@pytest.mark.parametrize("body", CHAT_BODIES.values(), ids=CHAT_BODIES)
def test_chat_completions(server: LocalGateway, body: dict[str, Any]):
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    validate(response.json(), "CreateChatCompletionResponse")
    for chunk in stream_chunks(server, "chat/completions", {**body, "stream_options": {"include_usage": True}}):
        validate(chunk, "CreateChatCompletionStreamResponse")


@pytest.mark.parametrize("body", COMPLETION_BODIES.values(), ids=COMPLETION_BODIES)
def test_completions(server: LocalGateway, body: dict[str, Any]):
    response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    validate(response.json(), "CreateCompletionResponse")
    streamed = {key: value for key, value in body.items() if key != "echo"}
    chunks = stream_chunks(server, "completions", {**streamed, "stream_options": {"include_usage": True}})
    assert chunks[-1]["usage"] is not None  # the usage chunk is checked too
    for chunk in chunks:
        validate(chunk, "CreateCompletionResponse")


def test_the_models_list(server: LocalGateway):
    validate(httpx.get(f"{server.url}/v1/models", timeout=30).json(), "ListModelsResponse")


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/v1/completions", {"model": "nope", "prompt": "x"}),
        ("POST", "/v1/completions", {"model": "tiny-base", "prompt": "x", "n": 99}),
        ("POST", "/v1/chat/completions", {"model": "tiny-chat", "messages": []}),
        ("GET", "/v1/nothing", None),
        ("DELETE", "/admin/grammar/tries/unknown", None),
    ],
)
def test_errors(server: LocalGateway, method: str, path: str, body: dict[str, Any] | None):
    response = httpx.request(method, f"{server.url}{path}", json=body, timeout=30)
    assert 400 <= response.status_code < 500
    validate(response.json(), "ErrorResponse")
