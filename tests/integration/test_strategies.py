"""Nudging, Transfer-Q* and GenARM through the HTTP API with the `openai` client, on the in-process engine."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from evaluation.gateway import LocalGateway

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How do I sort a list?"}]
TRANSFER_Q = {"baseline": "tiny-chat-shared", "reward": "rm", "top_k": 3, "rollout_tokens": 4}
GENARM = {"reward_model": "tiny-chat-shared", "top_k": 4, "beta": 0.5}


def details(choice: Any) -> dict[str, Any]:
    return (choice.model_extra or {}).get("alignment") or {}


def test_cross_tokenizer_nudging(client: openai.OpenAI):
    chat = client.chat.completions.create(
        model="tiny-base",
        messages=MESSAGES,
        max_tokens=24,
        extra_body={"alignment": {"nudging": {"nudger": "tiny-chat", "gamma": 0.3}, "return_details": True}},
    )
    record = details(chat.choices[0])["nudging"]
    assert record["spans"][0]["source"] == "tiny-chat"
    assert "".join(span["text"] for span in record["spans"]) == chat.choices[0].message.content
    assert 0 < record["nudged_token_fraction"] <= 1
    assert all(span["base_p1"] < 0.3 for span in record["spans"][1:] if span["source"] == "tiny-chat")
    assert chat.usage is not None and chat.usage.completion_tokens > 0


def test_nudging_with_best_of_n_and_guidelines(client: openai.OpenAI):
    completion = client.completions.create(
        model="tiny-base",
        prompt="Question: how do I sort a list?\nAnswer:",
        max_tokens=12,
        extra_body={
            "alignment": {
                "guidelines": {"top_k": 2},
                "nudging": {"nudger": "tiny-chat", "gamma": 0.5, "temperature": 0.8},
                "best_of_n": {"n": 2, "reward": "rm"},
                "return_details": True,
            }
        },
    )
    record = details(completion.choices[0])
    assert {"guidelines", "nudging", "best_of_n"} <= set(record)


def test_transfer_q(client: openai.OpenAI):
    completion = client.completions.create(
        model="tiny-base",
        prompt="def sort(items):",
        max_tokens=4,
        extra_body={"alignment": {"transfer_q": TRANSFER_Q, "return_details": True}},
    )
    record = details(completion.choices[0])["transfer_q"]
    assert record["decision_steps"] >= 1 and len(record["steps"][0]["candidates"]) == 3
    step = record["steps"][0]
    scores = [c["logprob"] + c["q"] for c in step["candidates"]]
    assert step["chosen"] == scores.index(max(scores))


def test_transfer_q_args_and_blockwise_on_chat(client: openai.OpenAI):
    for variant in ({"rollout_tokens": 0}, {"block_tokens": 3, "rollout_tokens": 2}):
        chat = client.chat.completions.create(
            model="tiny-chat-shared",
            messages=MESSAGES,
            max_tokens=6,
            extra_body={"alignment": {"transfer_q": {**TRANSFER_Q, **variant}, "return_details": True}},
        )
        assert details(chat.choices[0])["transfer_q"]["decision_steps"] >= 1


@pytest.mark.parametrize("stream", [False, True])
def test_genarm_follows_base_plus_arm_over_the_base_top_k(client: openai.OpenAI, stream: bool):
    response = client.completions.create(
        model="tiny-base", prompt="def sort(items):", max_tokens=5, stream=stream,
        extra_body={"alignment": {"genarm": {**GENARM, "temperature": 0}, "return_details": True}},
    )  # fmt: skip
    if stream:
        chunks = [chunk for chunk in response if chunk.choices]
        text, record = "".join(c.choices[0].text for c in chunks), details(chunks[-1].choices[0])["genarm"]
    else:
        text, record = response.choices[0].text, details(response.choices[0])["genarm"]
    assert record["decision_steps"] == len(record["steps"]) >= 1
    assert text == "".join(step["candidates"][step["chosen"]]["text"] for step in record["steps"])
    for step in record["steps"]:
        assert len(step["candidates"]) == GENARM["top_k"]
        scores = [c["logprob"] + c["q"] / GENARM["beta"] for c in step["candidates"]]
        assert step["chosen"] == scores.index(max(scores))
        assert all(c["q"] <= 0 for c in step["candidates"])  # log-probabilities of the ARM


def test_genarm_samples_with_a_seed_reproducibly(client: openai.OpenAI):
    def once() -> str:
        return client.completions.create(
            model="tiny-base", prompt="def sort(items):", max_tokens=6, seed=11,
            extra_body={"alignment": {"genarm": GENARM}},
        ).choices[0].text  # fmt: skip

    assert once() == once()


@pytest.mark.parametrize(
    ("alignment", "param"),
    [
        ({"genarm": {**GENARM, "reward_model": "tiny-chat"}}, "alignment.genarm.reward_model"),  # another tokenizer
        ({"genarm": {**GENARM, "reward_model": "rm"}}, "alignment.genarm.reward_model"),  # a scorer, not a model
        ({"genarm": {**GENARM, "top_k": 6}}, "alignment.genarm.top_k"),
        ({"genarm": {**GENARM, "beta": 0}}, "alignment.genarm.beta"),
        ({"genarm": GENARM, "transfer_q": TRANSFER_Q}, "alignment.transfer_q"),
        ({"nudging": {"nudger": "nope"}}, "alignment.nudging.nudger"),
        ({"nudging": {"nudger": "tiny-base"}}, "alignment.nudging.nudger"),  # no chat template: not a nudger
        ({"nudging": {"nudger": "tiny-chat", "max_rounds": 10_000}}, "alignment.nudging.max_rounds"),
        ({"transfer_q": {**TRANSFER_Q, "baseline": "tiny-chat"}}, "alignment.transfer_q.baseline"),
        ({"transfer_q": {**TRANSFER_Q, "reward": "tiny-chat"}}, "alignment.transfer_q.reward"),
        ({"transfer_q": {**TRANSFER_Q, "top_k": 6}}, "alignment.transfer_q.top_k"),
        ({"transfer_q": {**TRANSFER_Q, "rollouts": 64, "rollout_tokens": 500}}, "alignment.transfer_q"),
        ({"transfer_q": TRANSFER_Q, "nudging": {"nudger": "tiny-chat"}}, "alignment.nudging"),
    ],
)
def test_bad_strategy_requests(server: LocalGateway, alignment: dict[str, Any], param: str):
    body = {"model": "tiny-base", "prompt": "x", "max_tokens": 8, "alignment": alignment}
    response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_strategy_metrics(server: LocalGateway, client: openai.OpenAI):
    def sample(name: str, **labels: str) -> float:
        for line in httpx.get(f"{server.url}/metrics").text.splitlines():
            if line.startswith(f"{name}{{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    nudged = sample("alignd_nudged_token_fraction_count", model="tiny-base")
    steps = sample("alignd_transfer_q_decision_steps_total", model="tiny-base")
    calls = sample("alignd_engine_calls_per_request_count", model="tiny-base")
    used = sample("alignd_alignment_requests_total", method="transfer_q")
    genarm_steps = sample("alignd_genarm_decision_steps_total", model="tiny-base")
    client.completions.create(
        model="tiny-base", prompt="x", max_tokens=6, extra_body={"alignment": {"nudging": {"nudger": "tiny-chat"}}}
    )
    for method in ({"transfer_q": TRANSFER_Q}, {"genarm": GENARM}):
        client.completions.create(model="tiny-base", prompt="x", max_tokens=3, extra_body={"alignment": method})
    assert sample("alignd_nudged_token_fraction_count", model="tiny-base") == nudged + 1
    assert sample("alignd_genarm_decision_steps_total", model="tiny-base") >= genarm_steps + 1
    assert sample("alignd_transfer_q_decision_steps_total", model="tiny-base") >= steps + 1
    assert sample("alignd_engine_calls_per_request_count", model="tiny-base") == calls + 3
    assert sample("alignd_alignment_requests_total", method="transfer_q") == used + 1
