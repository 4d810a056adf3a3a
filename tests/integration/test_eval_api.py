"""What ``alignd eval`` reads from a deployment: ``POST /v1/rewards`` and the cost in ``usage.alignment``."""

from __future__ import annotations

import httpx
import openai
import pytest

from evaluation.gateway import LocalGateway

PROMPT = "def add(a, b):\n"  # ends in a newline: the response's tokens are its own in the echo as well


def rewards(gateway: LocalGateway, body: dict) -> httpx.Response:
    return httpx.post(f"{gateway.url}/v1/rewards", json=body, timeout=60)


def test_rewards_are_the_ones_best_of_n_selects_by(stack: LocalGateway, stack_client: openai.OpenAI):
    completion = stack_client.completions.create(
        model="tiny-base", prompt=PROMPT, max_tokens=8, seed=3,
        extra_body={"alignment": {"best_of_n": {"n": 3, "reward": "rm"}, "return_details": True}},
    )  # fmt: skip
    candidates = completion.choices[0].model_extra["alignment"]["best_of_n"]["candidates"]
    scored = rewards(
        stack, {"scorers": ["rm"], "input": [{"prompt": PROMPT, "response": c["text"]} for c in candidates]}
    )
    assert scored.status_code == 200, scored.text
    data = scored.json()["data"]
    assert [item["index"] for item in data] == [0, 1, 2]
    assert [item["rewards"]["rm"] for item in data] == pytest.approx([c["reward"] for c in candidates], abs=1e-4)


def test_a_chat_is_rendered_by_the_named_model_as_its_methods_render_it(server: LocalGateway, client: openai.OpenAI):
    messages = [{"role": "user", "content": "Say hi."}]
    chat = client.chat.completions.create(
        model="tiny-chat", messages=messages, max_tokens=8, seed=1,
        extra_body={"alignment": {"best_of_n": {"n": 2, "reward": "rm"}, "return_details": True}},
    )  # fmt: skip
    candidates = chat.choices[0].model_extra["alignment"]["best_of_n"]["candidates"]
    body = {"model": "tiny-chat", "scorers": ["rm"],
            "input": [{"messages": messages, "response": c["text"]} for c in candidates]}  # fmt: skip
    data = rewards(server, body).json()["data"]
    assert [item["rewards"]["rm"] for item in data] == pytest.approx([c["reward"] for c in candidates], abs=1e-5)
    # A model without a chat template: the plain-text chat that nudging and Transfer-Q* give a base model.
    plain = {"scorers": ["rm"], "input": [{"prompt": "User: Say hi.\nAssistant:", "response": " hi"}]}
    as_chat = {"model": "tiny-base", "scorers": ["rm"], "input": [{"messages": messages, "response": " hi"}]}
    assert rewards(server, as_chat).json()["data"] == rewards(server, plain).json()["data"]


def test_the_loglikelihood_is_the_sum_of_the_responses_echoed_logprobs(
    stack: LocalGateway, stack_client: openai.OpenAI
):
    response = "return a + b"
    echo = stack_client.completions.create(model="tiny-base", prompt=PROMPT + response, max_tokens=1, echo=True,
                                           logprobs=0, temperature=0)  # fmt: skip
    logprobs = echo.choices[0].logprobs
    assert logprobs is not None and logprobs.text_offset is not None and logprobs.token_logprobs is not None
    prompt_tokens = echo.usage.prompt_tokens
    offsets, values = logprobs.text_offset[:prompt_tokens], logprobs.token_logprobs[:prompt_tokens]
    expected = [v for offset, v in zip(offsets, values, strict=True) if offset >= len(PROMPT)]
    scored = rewards(stack, {"model": "tiny-base", "loglikelihood": True,
                             "input": [{"prompt": PROMPT, "response": response}]})  # fmt: skip
    assert scored.status_code == 200, scored.text
    [item] = scored.json()["data"]
    assert item["response_tokens"] == len(expected) and item["rewards"] == {}
    assert item["loglikelihood"] == pytest.approx(sum(expected), abs=1e-3)


@pytest.mark.parametrize(
    ("body", "status", "param", "message"),
    [
        ({"scorers": ["nope"], "input": [{"prompt": "a", "response": "b"}]}, 400, "scorers",
         "`nope` is not a configured reward scorer."),
        ({"scorers": ["rm"], "input": [{"prompt": "a", "messages": [{"role": "user", "content": "a"}],
                                        "response": "b"}]}, 400, "input.0.messages",
         "exactly one of `prompt` and `messages`"),
        ({"scorers": ["rm"], "input": [{"messages": [{"role": "user", "content": "a"}], "response": "b"}]}, 400,
         "model", "`model` is needed to render `messages`"),
        ({"scorers": [], "input": [{"prompt": "a", "response": "b"}]}, 400, "scorers", "Name at least one scorer"),
        ({"scorers": ["rm"], "input": []}, 400, "input", "at least 1 item"),
        ({"scorers": ["rm"], "input": [{"prompt": "a", "response": "b"}, {"prompt": "", "response": ""}]}, 400,
         "input.1", "is empty"),  # found by fuzzing: a 500 before
        ({"scorers": ["rm"], "input": [{"prompt": "a", "response": "b"}] * 65}, 400, "input",
         "`input` holds 65 pairs; at most 64"),
        ({"model": "nope", "scorers": ["rm"], "input": [{"prompt": "a", "response": "b"}]}, 404, "model", "nope"),
        ({"model": "tiny-base-short", "loglikelihood": True, "input": [{"prompt": "word " * 40,
                                                                         "response": " word" * 40}]}, 400, "input.0",
         "takes at most 63"),
    ],
)  # fmt: skip
def test_bad_reward_requests_are_refused_naming_the_field(
    server: LocalGateway, body: dict, status: int, param: str | None, message: str
):
    answer = rewards(server, body)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert message in error["message"]
    if param is not None:
        assert error["param"] == param
    assert rewards(server, {"scorers": ["is-json"], "input": [{"prompt": "a", "response": "{}"}]}).json()["data"][0][
        "rewards"
    ] == {"is-json": 1.0}


def test_usage_says_where_the_tokens_went_when_details_are_asked_for(client: openai.OpenAI):
    alignment = {"best_of_n": {"n": 3, "reward": "rm"}}
    plain = client.completions.create(
        model="tiny-base", prompt=PROMPT, max_tokens=4, extra_body={"alignment": alignment}
    )
    assert "alignment" not in (plain.usage.model_extra or {})
    detailed = client.completions.create(model="tiny-base", prompt=PROMPT, max_tokens=4,
                                         extra_body={"alignment": {**alignment, "return_details": True}})  # fmt: skip
    usage = detailed.usage
    cost = usage.model_extra["alignment"]
    assert cost["engine_calls"] == 1
    assert cost["models"] == {"tiny-base": {"prompt_tokens": usage.prompt_tokens,
                                            "completion_tokens": usage.completion_tokens}}  # fmt: skip
