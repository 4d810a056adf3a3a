"""Both endpoints through the official ``openai`` client: sync, async and streaming."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from evaluation.gateway import LocalGateway

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


def test_models_are_listed(client: openai.OpenAI):
    models = {model.id: model for model in client.models.list()}
    assert set(models) == {
        "tiny-base",
        "tiny-chat",
        "tiny-chat-shared",
        "tiny-base-short",
        "tiny-chat-short",
        "tiny-chat-unsure",
        "tiny-chat-safe",
    }
    assert (models["tiny-chat-safe"].model_extra or {})["root"] == "tiny-chat"


def test_completion(client: openai.OpenAI):
    completion = client.completions.create(model="tiny-base", prompt="def main():", max_tokens=6, temperature=0)
    choice = completion.choices[0]
    assert completion.object == "text_completion" and completion.model == "tiny-base"
    assert choice.text and choice.finish_reason in ("stop", "length")
    assert completion.usage is not None
    assert completion.usage.completion_tokens <= 6
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens


def test_completion_with_token_ids_and_echo_logprobs(client: openai.OpenAI):
    text = client.completions.create(model="tiny-base", prompt="import os", max_tokens=1, echo=True, temperature=0)
    completion = client.completions.create(
        model="tiny-base", prompt=[1000, 1001, 1002], max_tokens=3, logprobs=2, echo=True, temperature=0
    )
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None and logprobs.token_logprobs is not None and logprobs.top_logprobs is not None
    assert len(logprobs.token_logprobs) == 3 + completion.usage.completion_tokens
    assert logprobs.token_logprobs[0] is None and all(lp is not None for lp in logprobs.token_logprobs[1:])
    assert all(len(top) <= 2 for top in logprobs.top_logprobs[1:])
    assert text.choices[0].text.startswith("import os")


def test_n_choices(client: openai.OpenAI):
    completion = client.completions.create(model="tiny-base", prompt="class A:", max_tokens=5, n=3, seed=1)
    assert sorted(choice.index for choice in completion.choices) == [0, 1, 2]
    chat = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=5, n=2, seed=1)
    assert len(chat.choices) == 2


def test_seed_reproduces_through_the_api(client: openai.OpenAI):
    def ask(seed: int) -> list[str]:
        chat = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=8, n=2, seed=seed)
        return [choice.message.content or "" for choice in chat.choices]

    assert ask(7) == ask(7)
    assert ask(7) != ask(8)


def test_stop_strings(client: openai.OpenAI):
    free = client.completions.create(model="tiny-base", prompt="x = ", max_tokens=20, temperature=0)
    text = free.choices[0].text
    stopped = client.completions.create(
        model="tiny-base", prompt="x = ", max_tokens=20, temperature=0, stop=[text[4:7]]
    )
    assert stopped.choices[0].text == text[: text.index(text[4:7])]
    assert stopped.choices[0].finish_reason == "stop"


def test_chat_with_logprobs(client: openai.OpenAI):
    chat = client.chat.completions.create(
        model="tiny-chat", messages=MESSAGES, max_tokens=4, logprobs=True, top_logprobs=3, temperature=0
    )
    choice = chat.choices[0]
    assert choice.message.role == "assistant"
    assert choice.logprobs is not None and choice.logprobs.content
    for token in choice.logprobs.content:
        assert len(token.top_logprobs) == 3
        assert token.logprob <= 0 and token.top_logprobs[0].logprob >= token.logprob
        assert bytes(token.bytes or []).decode() == token.token


async def test_async_clients_run_concurrently(async_client: openai.AsyncOpenAI):
    requests = [
        async_client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=6, seed=s)
        for s in range(4)
    ] + [async_client.completions.create(model="tiny-base", prompt="for i in", max_tokens=6, seed=s) for s in range(4)]
    results = await asyncio.gather(*requests)
    assert all(result.usage and result.usage.completion_tokens > 0 for result in results)


def test_streaming_chat_matches_non_streaming(client: openai.OpenAI):
    reference = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=12, temperature=0)
    stream = client.chat.completions.create(
        model="tiny-chat", messages=MESSAGES, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reference.choices[0].message.content
    )
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [reference.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == reference.usage


async def test_streaming_completion_async_with_n(async_client: openai.AsyncOpenAI):
    reference = await async_client.completions.create(model="tiny-base", prompt="if x:", max_tokens=10, n=2, seed=3)
    stream = await async_client.completions.create(
        model="tiny-base", prompt="if x:", max_tokens=10, n=2, seed=3, stream=True
    )
    texts = ["", ""]
    async for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == [choice.text for choice in sorted(reference.choices, key=lambda c: c.index)]


def test_raw_stream_is_openai_framed(server: LocalGateway):
    body = {"model": "tiny-base", "prompt": "a", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    data = [line for line in lines if line.startswith("data: ")]
    assert data[-1] == "data: [DONE]"
    assert all(line.startswith(("data: ", ":")) for line in lines)


def test_health_ready_and_request_id(server: LocalGateway):
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    ready = httpx.get(f"{server.url}/ready").json()
    assert ready["status"] == "ready"
    response = httpx.get(f"{server.url}/v1/models", headers={"x-request-id": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_metrics_count_what_was_served(server: LocalGateway, client: openai.OpenAI, route: str):
    def sample(name: str, **labels: str) -> float:
        text = httpx.get(f"{server.url}/metrics").text
        wanted = ",".join(f'{key}="{value}"' for key, value in labels.items())
        for line in text.splitlines():
            if line.startswith(f"{name}{{") and all(f'{key}="{value}"' in line for key, value in labels.items()):
                return float(line.rsplit(" ", 1)[1])
        return 0.0 if wanted else float("nan")

    model = "tiny-base" if route == "/v1/completions" else "tiny-chat"
    before = sample("alignd_requests_total", route=route, model=model, status="200")
    tokens_before = sample("alignd_tokens_total", model=model, kind="completion")
    errors_before = sample("alignd_errors_total", route=route, model=model, type="invalid_request_error")
    for _ in range(2):
        if model == "tiny-base":
            client.completions.create(model=model, prompt="x", max_tokens=3)
        else:
            client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=3)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model, prompt="x", max_tokens=3, n=99) if model == "tiny-base" else (
            client.chat.completions.create(model=model, messages=MESSAGES, n=99)
        )
    assert sample("alignd_requests_total", route=route, model=model, status="200") == before + 2
    assert sample("alignd_tokens_total", model=model, kind="completion") > tokens_before
    assert sample("alignd_errors_total", route=route, model=model, type="invalid_request_error") == errors_before + 1
    assert sample("alignd_request_duration_seconds_count", route=route, model=model) >= before + 3
