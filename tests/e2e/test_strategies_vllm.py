"""Nudging, Transfer-Q* and GenARM on vLLM CPU workers: cross-tokenizer nudging, batched rollouts, replica affinity,
the ARM's prompt logprobs."""

from __future__ import annotations

from typing import Any

import httpx
import openai

from evaluation.gateway import LocalGateway

MESSAGES = [{"role": "user", "content": "How do I sort a list in Python?"}]


def details(choice: Any) -> dict[str, Any]:
    return (choice.model_extra or {}).get("alignment") or {}


def served(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    name = "vllm:request_success_total{"
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def base_replicas(gateway: LocalGateway) -> list[str]:
    ready = httpx.get(f"{gateway.url}/ready", timeout=5).json()["models"]
    return [replica["url"] for replica in ready["tiny-base"]["replicas"]]


def test_cross_tokenizer_nudging_keeps_one_base_replica(vllm_gateway: LocalGateway, client: openai.OpenAI):
    urls = base_replicas(vllm_gateway)
    before = [served(url) for url in urls]
    chat = client.chat.completions.create(
        model="tiny-base",
        messages=MESSAGES,
        max_tokens=24,
        extra_body={"alignment": {"nudging": {"nudger": "tiny-chat", "gamma": 0.3}, "return_details": True}},
    )
    record = details(chat.choices[0])["nudging"]
    assert record["spans"][0]["source"] == "tiny-chat"
    assert "".join(span["text"] for span in record["spans"]) == chat.choices[0].message.content
    calls = [served(url) - b for url, b in zip(urls, before, strict=True)]
    assert sum(calls) >= 2 and min(calls) == 0  # every base call of the request went to one replica


def test_transfer_q_with_batched_rollouts(vllm_gateway: LocalGateway, client: openai.OpenAI):
    completion = client.completions.create(
        model="tiny-base",
        prompt="def sort(items):",
        max_tokens=3,
        extra_body={
            "alignment": {
                "transfer_q": {"baseline": "tiny-chat-shared", "reward": "rm", "top_k": 4, "rollout_tokens": 5,
                               "rollouts": 2},
                "return_details": True,
            }
        },
    )  # fmt: skip
    record = details(completion.choices[0])["transfer_q"]
    assert record["decision_steps"] >= 1
    step = record["steps"][0]
    assert len(step["candidates"]) == 4
    scores = [c["logprob"] + c["q"] for c in step["candidates"]]
    assert step["chosen"] == scores.index(max(scores))


def test_genarm_scores_the_base_top_k_with_the_arms_prompt_logprobs(client: openai.OpenAI):
    genarm = {"reward_model": "tiny-chat-shared", "top_k": 4, "beta": 0.5, "temperature": 0}
    completion = client.completions.create(
        model="tiny-base", prompt="def sort(items):", max_tokens=3,
        extra_body={"alignment": {"genarm": genarm, "return_details": True}},
    )  # fmt: skip
    record = details(completion.choices[0])["genarm"]
    assert record["decision_steps"] >= 1
    assert completion.choices[0].text == "".join(s["candidates"][s["chosen"]]["text"] for s in record["steps"])
    for step in record["steps"]:
        assert len(step["candidates"]) == 4 and all(c["q"] <= 0 for c in step["candidates"])
        scores = [c["logprob"] + c["q"] / genarm["beta"] for c in step["candidates"]]
        assert step["chosen"] == scores.index(max(scores))
