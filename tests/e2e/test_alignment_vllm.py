"""The alignment pipeline on vLLM CPU workers: best-of-N with a pooling reward worker, calibration, early
rejection, abstention, guidelines, profiles."""

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


def test_calibrated_best_of_n_and_early_rejection(client: openai.OpenAI):
    def run(alignment: dict[str, Any]) -> Any:
        return client.completions.create(
            model="tiny-base", prompt="def parse(text):", max_tokens=16, seed=4, temperature=1.0,
            extra_body={"alignment": {**alignment, "return_details": True}},
        )  # fmt: skip

    best = run({"best_of_n": {"n": 8, "reward": "rm"}})
    calibrated = run({"best_of_n": {"n": 8, "reward": "rm", "calibrate": {"references": 8}}})
    same = run({"early_rejection": {"n": 8, "reward": "rm", "rejection_rate": 0}})
    early = run({"early_rejection": {"n": 8, "reward": "rm", "first_checkpoint": 4, "rejection_rate": 0.75}})
    assert calibrated.choices[0].text == same.choices[0].text == best.choices[0].text  # max: unchanged
    assert len(details(calibrated.choices[0])["best_of_n"]["reference_rewards"]["rm"]) == 8
    assert len(details(early.choices[0])["early_rejection"]["checkpoints"][0]["kept"]) == 2
    assert early.usage is not None and best.usage is not None
    assert early.usage.completion_tokens < best.usage.completion_tokens


def test_abstain_on_a_vllm_worker(client: openai.OpenAI):
    alignment = {"uncertainty": {}, "abstain": {"threshold": 0.0, "answer": "I do not know."}, "return_details": True}
    chat = client.chat.completions.create(
        model="tiny-chat", messages=MESSAGES, max_tokens=5, temperature=0, extra_body={"alignment": alignment}
    )
    record = details(chat.choices[0])
    assert chat.choices[0].message.content == "I do not know." and record["abstain"]["abstained"] is True
    assert record["uncertainty"]["nll"] > 0
