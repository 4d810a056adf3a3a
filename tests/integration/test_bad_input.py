"""Bad input gets a 4xx OpenAI error naming the field; the server keeps serving."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from typing import Any

import httpx
import openai
import pytest

from evaluation.gateway import LocalGateway

USER = [{"role": "user", "content": "hi"}]

CASES: list[tuple[str, str, dict[str, Any], int, str | None, str]] = [
    # (id, route, body, status, param, code)
    ("unknown-model", "completions", {"model": "gpt-9", "prompt": "x"}, 404, "model", "model_not_found"),
    ("unknown-model-chat", "chat/completions", {"model": "gpt-9", "messages": USER}, 404, "model", "model_not_found"),
    ("missing-prompt", "completions", {"model": "tiny-base"}, 400, "prompt", "invalid_request"),
    ("missing-messages", "chat/completions", {"model": "tiny-chat"}, 400, "messages", "invalid_request"),
    ("empty-messages", "chat/completions", {"model": "tiny-chat", "messages": []}, 400, "messages", "invalid_request"),
    ("missing-model", "completions", {"prompt": "x"}, 400, "model", "invalid_request"),
    ("wrong-type-max-tokens", "completions", {"model": "tiny-base", "prompt": "x", "max_tokens": "ten"}, 400,
     "max_tokens", "invalid_request"),
    ("wrong-type-temperature", "chat/completions", {"model": "tiny-chat", "messages": USER, "temperature": "hot"},
     400, "temperature", "invalid_request"),
    ("wrong-type-messages", "chat/completions", {"model": "tiny-chat", "messages": "hi"}, 400, "messages",
     "invalid_request"),
    ("bad-role", "chat/completions", {"model": "tiny-chat", "messages": [{"role": "robot", "content": "x"}]}, 400,
     "messages.0.role", "invalid_request"),
    ("zero-max-tokens", "completions", {"model": "tiny-base", "prompt": "x", "max_tokens": 0}, 400, "max_tokens",
     "invalid_request"),
    ("negative-max-tokens", "chat/completions", {"model": "tiny-chat", "messages": USER, "max_tokens": -5}, 400,
     "max_tokens", "invalid_request"),
    ("max-tokens-beyond-context", "completions", {"model": "tiny-base-short", "prompt": "x", "max_tokens": 100},
     400, "max_tokens", "context_length_exceeded"),
    ("prompt-beyond-context", "completions", {"model": "tiny-base-short", "prompt": "word " * 200}, 400, "prompt",
     "context_length_exceeded"),
    ("messages-beyond-context", "chat/completions",
     {"model": "tiny-chat-short", "messages": [{"role": "user", "content": "word " * 200}]}, 400, "messages",
     "context_length_exceeded"),
    ("chat-max-tokens-beyond-context", "chat/completions",
     {"model": "tiny-chat-short", "messages": USER, "max_completion_tokens": 60}, 400, "max_completion_tokens",
     "context_length_exceeded"),
    ("seed-beyond-int64", "completions", {"model": "tiny-base", "prompt": "x", "seed": 2**64}, 400, "seed",
     "invalid_request"),
    ("n-too-large", "completions", {"model": "tiny-base", "prompt": "x", "n": 9}, 400, "n", "invalid_request"),
    ("n-zero", "chat/completions", {"model": "tiny-chat", "messages": USER, "n": 0}, 400, "n", "invalid_request"),
    ("logprobs-too-many", "completions", {"model": "tiny-base", "prompt": "x", "logprobs": 6}, 400, "logprobs",
     "invalid_request"),
    ("top-logprobs-too-many", "chat/completions",
     {"model": "tiny-chat", "messages": USER, "logprobs": True, "top_logprobs": 6}, 400, "top_logprobs",
     "invalid_request"),
    ("top-logprobs-without-logprobs", "chat/completions", {"model": "tiny-chat", "messages": USER, "top_logprobs": 2},
     400, "top_logprobs", "invalid_request"),
    ("unsupported-tools", "chat/completions", {"model": "tiny-chat", "messages": USER, "tools": [{"type": "x"}]},
     400, "tools", "unsupported_parameter"),
    ("unsupported-penalty", "completions", {"model": "tiny-base", "prompt": "x", "presence_penalty": 0.5}, 400,
     "presence_penalty", "unsupported_parameter"),
    ("unsupported-best-of", "completions", {"model": "tiny-base", "prompt": "x", "best_of": 3}, 400, "best_of",
     "unsupported_parameter"),
    ("batched-prompts", "completions", {"model": "tiny-base", "prompt": ["a", "b"]}, 400, "prompt",
     "unsupported_parameter"),
    ("unknown-parameter", "completions", {"model": "tiny-base", "prompt": "x", "colour": "red"}, 400, "colour",
     "invalid_request"),
    ("token-ids-out-of-vocabulary", "completions", {"model": "tiny-base", "prompt": [5, 99999]}, 400, "prompt",
     "invalid_request"),
    ("chat-without-template", "chat/completions", {"model": "tiny-base", "messages": USER}, 400, "messages",
     "invalid_request"),
    # Found by fuzzing: token ids are checked before anything reads them, and before a stream's 200.
    ("negative-token-id-transfer-q", "completions", {"model": "tiny-base", "prompt": [-1], "alignment": {
        "transfer_q": {"baseline": "tiny-chat-shared", "reward": "rm", "top_k": 3}}}, 400, "prompt", "invalid_request"),
    ("huge-token-id-transfer-q", "completions", {"model": "tiny-base", "prompt": [9999999999999], "alignment": {
        "transfer_q": {"baseline": "tiny-chat-shared", "reward": "rm", "top_k": 3}}}, 400, "prompt", "invalid_request"),
    ("negative-token-id-streamed", "completions", {"model": "tiny-base", "prompt": [-1], "stream": True}, 400,
     "prompt", "invalid_request"),
    ("huge-token-id-streamed", "completions", {"model": "tiny-base", "prompt": [2**70], "stream": True}, 400,
     "prompt", "invalid_request"),
    # Hostile sizes: every stop string is looked for after every token, every grammar compiled.
    ("too-many-stop-sequences", "completions", {"model": "tiny-base", "prompt": "x", "stop": ["s"] * 17}, 400,
     "stop", "invalid_request"),
    ("stop-sequence-too-long", "chat/completions", {"model": "tiny-chat", "messages": USER, "stop": "s" * 1001},
     400, "stop", "invalid_request"),
    ("grammar-too-large", "completions", {"model": "tiny-base", "prompt": "x", "alignment": {
        "grammar": {"grammar": 'root ::= "' + "a" * 5000 + '"'}}}, 400, "alignment.grammar.grammar", "invalid_request"),
    ("json-schema-too-large", "chat/completions", {"model": "tiny-chat", "messages": USER, "response_format": {
        "type": "json_schema", "json_schema": {"name": "big", "schema": {"type": "object", "properties": {
            f"field_{i}": {"type": "string"} for i in range(400)}}}}}, 400, "response_format", "invalid_request"),
]  # fmt: skip


def _chunks(body: bytes, size: int = 8192):  # type: ignore[no-untyped-def]
    for start in range(0, len(body), size):
        yield body[start : start + size]


LONG_PROMPT = b'{"model": "tiny-base", "prompt": "' + b"x" * 70_000 + b'"}'


@pytest.mark.parametrize(
    ("content", "status", "code"),
    [
        (LONG_PROMPT, 413, "request_too_large"),
        (_chunks(LONG_PROMPT), 413, "request_too_large"),  # no Content-Length: counted as it arrives
        (b"[" * 30_000 + b"]" * 30_000, 400, None),
        (b'{"model": "tiny-base", "prompt": "' + bytes([0xFF, 0xFE]) + b'"}', 400, None),
    ],
    ids=["over-the-size", "over-the-size-chunked", "deeply-nested", "invalid-utf-8"],
)  # fmt: skip
def test_hostile_bodies_are_clear_4xx_and_the_server_keeps_serving(
    server: LocalGateway, content: Any, status: int, code: str | None
):
    response = httpx.post(f"{server.url}/v1/completions", content=content,
                          headers={"content-type": "application/json"}, timeout=30)  # fmt: skip
    assert response.status_code == status, response.text[:300]
    error = response.json()["error"]
    assert error["message"] and (code is None or error["code"] == code)
    ok = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny-base", "prompt": "x", "max_tokens": 2})
    assert ok.status_code == 200


@pytest.mark.parametrize(
    ("route", "extreme"),
    [("completions", {"top_p": 5e-324}), ("completions", {"temperature": 1.401298464324817e-45}),
     ("chat/completions", {"top_p": 5e-324}), ("chat/completions", {"temperature": 1.401298464324817e-45})],
)  # fmt: skip
def test_numerically_extreme_sampling_is_greedy(server: LocalGateway, route: str, extreme: dict[str, float]):
    """Found by fuzzing (500s before): a top_p below rounding error or a temperature too small to divide by."""
    prompt = {"prompt": "def f(x):"} if route == "completions" else {"messages": USER}
    model = "tiny-base" if route == "completions" else "tiny-chat"

    def text(**sampling: float) -> str:
        body = {"model": model, **prompt, "max_tokens": 6, "seed": 1, **sampling}
        response = httpx.post(f"{server.url}/v1/{route}", json=body, timeout=30)
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        return choice["text"] if route == "completions" else choice["message"]["content"]

    assert text(**extreme) == text(temperature=0)


@pytest.mark.parametrize(
    ("route", "body", "status", "param", "code"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_request_is_a_named_4xx(
    server: LocalGateway, route: str, body: dict[str, Any], status: int, param: str | None, code: str
):
    response = httpx.post(f"{server.url}/v1/{route}", json=body, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["param"], error["code"]) == (param, code)
    assert error["message"]


@pytest.mark.parametrize("payload", [b"{not json", b"", b"[1, 2]", b'{"model": "tiny-base", "prompt": "x",}'], ids=repr)
def test_malformed_json(server: LocalGateway, payload: bytes):
    response = httpx.post(
        f"{server.url}/v1/completions", content=payload, headers={"content-type": "application/json"}, timeout=30
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_unknown_route_and_method(server: LocalGateway):
    assert httpx.get(f"{server.url}/v1/nothing").json()["error"]["code"] == "not_found"
    response = httpx.get(f"{server.url}/v1/completions")
    assert response.status_code == 405 and response.json()["error"]["code"] == "method_not_allowed"


def test_openai_client_raises_typed_errors(client: openai.OpenAI):
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="nope", prompt="x")
    assert missing.value.body["param"] == "model"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model="tiny-base-short", prompt="x", max_tokens=1000)
    assert too_long.value.code == "context_length_exceeded"


async def test_bad_requests_do_not_disturb_good_ones(async_client: openai.AsyncOpenAI, server: LocalGateway):
    async def bad() -> int:
        async with httpx.AsyncClient(timeout=30) as http:
            response = await http.post(
                f"{server.url}/v1/completions", json={"model": "tiny-base", "prompt": "x", "n": 0}
            )
        return response.status_code

    async def good() -> str:
        completion = await async_client.completions.create(model="tiny-base", prompt="print(", max_tokens=8)
        return completion.choices[0].finish_reason

    results = await asyncio.gather(*[bad() for _ in range(10)], *[good() for _ in range(4)])
    assert results[:10] == [400] * 10
    assert all(reason in ("stop", "length") for reason in results[10:])


def test_client_disconnect_mid_stream_keeps_the_server_serving(server: LocalGateway, client: openai.OpenAI):
    body = {"model": "tiny-base", "prompt": "x", "max_tokens": 1500, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as response:
        next(response.iter_lines())
    completion = client.completions.create(model="tiny-base", prompt="x", max_tokens=2)
    assert completion.choices[0].finish_reason in ("stop", "length")


def test_a_non_streaming_request_is_cancelled_when_its_client_hangs_up(server: LocalGateway):
    def hung_up() -> float:
        for line in httpx.get(f"{server.url}/metrics").text.splitlines():
            if line.startswith("alignd_requests_total{") and 'status="499"' in line:
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    before = hung_up()
    payload = json.dumps({"model": "tiny-base", "prompt": "x", "max_tokens": 1500, "n": 4}).encode()
    head = "POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: "
    with socket.create_connection(("127.0.0.1", server.port)) as connection:
        connection.sendall(f"{head}{len(payload)}\r\n\r\n".encode() + payload)
        connection.settimeout(0.3)
        with contextlib.suppress(TimeoutError):
            connection.recv(4096)
    deadline = time.monotonic() + 10
    while hung_up() == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert hung_up() == before + 1  # the handler was cancelled (499), not run to its end
