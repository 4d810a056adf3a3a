"""The alignment pipeline on vLLM CPU workers: best-of-N with a pooling reward worker, guidelines, profiles."""

from __future__ import annotations

from typing import Any

import httpx
import openai

from evaluation.gateway import LocalGateway

MESSAGES = [{"role": "user", "content": "Write a python function that parses ISO dates"}]


def details(choice: Any) -> dict[str, Any]:
    return (choice.model_extra or {}).get("alignment") or {}


def worker_metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(f"{name}{{"))


def test_best_of_n_is_one_n_call_and_one_pooling_call(vllm_gateway: LocalGateway, client: openai.OpenAI):
    ready = httpx.get(f"{vllm_gateway.url}/ready").json()["models"]
    base_urls = [replica["url"] for replica in ready["tiny-base"]["replicas"]]
    reward_url = ready["rm"]["replicas"][0]["url"]
    requests_before = sum(worker_metric(url, "vllm:request_success_total") for url in base_urls)
    pooled_before = worker_metric(reward_url, "vllm:request_success_total")
    completion = client.completions.create(
        model="tiny-base",
        prompt="def parse(text):",
        max_tokens=8,
        extra_body={"alignment": {"best_of_n": {"n": 4, "reward": "rm"}, "return_details": True}},
    )
    record = details(completion.choices[0])["best_of_n"]
    rewards = [candidate["reward"] for candidate in record["candidates"]]
    assert record["candidates"][record["chosen"]]["reward"] == max(rewards) and len(rewards) == 4
    # vLLM counts each of the n samples as a finished request; the reward worker saw the 4 responses.
    assert sum(worker_metric(url, "vllm:request_success_total") for url in base_urls) - requests_before == 4
    assert worker_metric(reward_url, "vllm:request_success_total") - pooled_before == 4
    assert completion.usage is not None and 4 <= completion.usage.completion_tokens <= 4 * 8


def test_guidelines_and_best_of_n_through_a_profile(client: openai.OpenAI):
    chat = client.chat.completions.create(
        model="tiny-chat-safe", messages=MESSAGES, max_tokens=6, extra_body={"alignment": {"return_details": True}}
    )
    record = details(chat.choices[0])
    assert record["guidelines"]["guidelines"][0]["category"] == "code"
    assert len(record["best_of_n"]["candidates"]) == 3


def test_streaming_plain_and_selected(client: openai.OpenAI):
    stream = client.chat.completions.create(
        model="tiny-chat-safe", messages=MESSAGES, max_tokens=6, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert any(chunk.choices and chunk.choices[0].finish_reason for chunk in chunks)
