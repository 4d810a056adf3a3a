"""The alignment extension through the HTTP API with the `openai` client, on the in-process engine."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from evaluation.gateway import LocalGateway

MESSAGES = [{"role": "user", "content": "I feel hopeless and want to end it all"}]


def details(choice: Any) -> dict[str, Any]:
    return (choice.model_extra or {}).get("alignment") or {}


def test_best_of_n_alone(client: openai.OpenAI):
    completion = client.completions.create(
        model="tiny-base",
        prompt="def add(a, b):",
        max_tokens=6,
        seed=1,
        extra_body={"alignment": {"best_of_n": {"n": 4, "reward": "rm"}, "return_details": True}},
    )
    record = details(completion.choices[0])["best_of_n"]
    rewards = [candidate["reward"] for candidate in record["candidates"]]
    assert len(rewards) == 4 and record["candidates"][record["chosen"]]["reward"] == max(rewards)
    assert completion.usage is not None and completion.usage.completion_tokens > len(completion.choices[0].text) * 0


def test_guidelines_alone(client: openai.OpenAI):
    chat = client.chat.completions.create(
        model="tiny-chat",
        messages=MESSAGES,
        max_tokens=4,
        extra_body={"alignment": {"guidelines": {"top_k": 3}, "return_details": True}},
    )
    record = details(chat.choices[0])["guidelines"]
    assert record["library"] == "default" and 1 <= len(record["guidelines"]) <= 3
    assert record["guidelines"][0]["category"] == "self-harm"


def test_guidelines_change_the_prompt_the_model_sees(client: openai.OpenAI):
    def prompt_tokens(alignment: dict | None) -> int:
        extra = {"alignment": alignment} if alignment else None
        chat = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=1, extra_body=extra)
        assert chat.usage is not None
        return chat.usage.prompt_tokens

    assert prompt_tokens({"guidelines": {"top_k": 2}}) > prompt_tokens(None) + 20


async def test_guidelines_and_best_of_n_together(async_client: openai.AsyncOpenAI):
    chat = await async_client.chat.completions.create(
        model="tiny-chat",
        messages=MESSAGES,
        max_tokens=5,
        n=2,
        extra_body={
            "alignment": {
                "guidelines": {"top_k": 2},
                "best_of_n": {"n": 4, "reward": ["rm", "is-json"], "aggregate": "mean"},
                "return_details": True,
            }
        },
    )
    assert len(chat.choices) == 2
    first, second = (details(choice) for choice in chat.choices)
    assert first["guidelines"] == second["guidelines"]
    assert [first["best_of_n"]["rank"], second["best_of_n"]["rank"]] == [0, 1]
    assert set(first["best_of_n"]["candidates"][0]["rewards"]) == {"rm", "is-json"}


def test_a_profile_used_by_plain_model_name(client: openai.OpenAI):
    assert "tiny-chat-safe" in {model.id for model in client.models.list()}
    chat = client.chat.completions.create(model="tiny-chat-safe", messages=MESSAGES, max_tokens=5)
    assert chat.model == "tiny-chat-safe"
    assert details(chat.choices[0]) == {}  # details only when asked
    plain = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=5)
    assert chat.usage is not None and plain.usage is not None
    assert chat.usage.prompt_tokens > plain.usage.prompt_tokens  # the profile's guidelines were injected
    overridden = client.chat.completions.create(
        model="tiny-chat-safe",
        messages=MESSAGES,
        max_tokens=5,
        extra_body={"alignment": {"best_of_n": {"n": 2}, "return_details": True}},
    )
    record = details(overridden.choices[0])
    assert record["best_of_n"]["n"] == 2 and "guidelines" in record  # field by field over the profile


def test_streaming_with_best_of_n_sends_the_selected_answer(client: openai.OpenAI):
    alignment = {"best_of_n": {"n": 3, "reward": "rm"}}
    reference = client.chat.completions.create(
        model="tiny-chat", messages=MESSAGES, max_tokens=6, seed=5, extra_body={"alignment": alignment}
    )
    stream = client.chat.completions.create(
        model="tiny-chat", messages=MESSAGES, max_tokens=6, seed=5, stream=True, extra_body={"alignment": alignment}
    )
    chunks = [chunk for chunk in stream if chunk.choices]
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    assert text == reference.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == reference.choices[0].finish_reason


BAD: list[tuple[str, dict[str, Any], str]] = [
    ("unknown-method", {"best_of_m": {"n": 2}}, "alignment.best_of_m"),
    ("out-of-range", {"best_of_n": {"n": 0, "reward": "rm"}}, "alignment.best_of_n.n"),
    ("beyond-server-limit", {"best_of_n": {"n": 9, "reward": "rm"}}, "alignment.best_of_n.n"),
    ("unknown-scorer", {"best_of_n": {"n": 2, "reward": "no-such-rm"}}, "alignment.best_of_n.reward"),
    ("model-as-scorer", {"best_of_n": {"n": 2, "reward": "tiny-base"}}, "alignment.best_of_n.reward"),
    ("unknown-field", {"guidelines": {"top_k": 2, "k": 3}}, "alignment.guidelines.k"),
    ("unknown-library", {"guidelines": {"library": "nope"}}, "alignment.guidelines.library"),
    ("bad-details-flag", {"return_details": "yes"}, "alignment.return_details"),
    ("too-many-references", {"best_of_n": {"reward": "rm", "calibrate": {"references": 65}}},
     "alignment.best_of_n.calibrate.references"),
    ("unknown-transform", {"best_of_n": {"reward": "rm", "calibrate": {"transform": "log"}}},
     "alignment.best_of_n.calibrate.transform"),
    ("abstain-without-threshold", {"abstain": {}}, "alignment.abstain.threshold"),
    ("negative-threshold", {"abstain": {"threshold": -1}}, "alignment.abstain.threshold"),
]  # fmt: skip


@pytest.mark.parametrize(("alignment", "param"), [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_alignment_is_a_400_naming_it(server: LocalGateway, alignment: dict[str, Any], param: str):
    body = {"model": "tiny-chat", "messages": MESSAGES, "max_tokens": 2, "alignment": alignment}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_combinations_that_cannot_work_are_400s(server: LocalGateway):
    more_than_candidates = {
        "model": "tiny-base",
        "prompt": "x",
        "n": 3,
        "alignment": {"best_of_n": {"n": 2, "reward": "rm"}},
    }
    response = httpx.post(f"{server.url}/v1/completions", json=more_than_candidates, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == "n"
    token_ids = {"model": "tiny-base", "prompt": [5, 6, 7], "alignment": {"guidelines": {}}}
    response = httpx.post(f"{server.url}/v1/completions", json=token_ids, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == "alignment.guidelines"


def test_calibrated_best_of_n_counts_its_reference_samples_in_usage(client: openai.OpenAI):
    def run(alignment: dict[str, Any]) -> Any:
        return client.completions.create(
            model="tiny-base", prompt="def add(a, b):", max_tokens=6, seed=2, temperature=1.0,
            extra_body={"alignment": {"best_of_n": alignment, "return_details": True}},
        )  # fmt: skip

    raw = run({"n": 4, "reward": "rm"})
    calibrated = run({"n": 4, "reward": "rm", "calibrate": {"references": 8, "transform": "best_of_n"}})
    record = details(calibrated.choices[0])["best_of_n"]
    assert len(record["reference_rewards"]["rm"]) == 8
    assert all(c["calibrated"]["rm"] > 0 for c in record["candidates"])  # exp(t·u) > 0
    assert calibrated.choices[0].text == raw.choices[0].text  # max selection: unchanged by calibration
    assert calibrated.usage is not None and raw.usage is not None
    assert calibrated.usage.completion_tokens > raw.usage.completion_tokens


def test_calibration_of_greedy_samples_is_a_400(server: LocalGateway):
    body = {"model": "tiny-base", "prompt": "x", "temperature": 0,
            "alignment": {"best_of_n": {"reward": "rm", "calibrate": {}}}}  # fmt: skip
    response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == "alignment.best_of_n.calibrate"


@pytest.mark.parametrize("stream", [False, True])
def test_abstain_and_uncertainty_through_the_api(client: openai.OpenAI, stream: bool):
    def run(threshold: float) -> tuple[str, dict[str, Any]]:
        alignment = {"uncertainty": {}, "abstain": {"threshold": threshold, "answer": "I do not know."},
                     "return_details": True}  # fmt: skip
        response = client.chat.completions.create(
            model="tiny-chat", messages=MESSAGES, max_tokens=5, temperature=0, stream=stream,
            extra_body={"alignment": alignment},
        )  # fmt: skip
        if not stream:
            return response.choices[0].message.content or "", details(response.choices[0])
        chunks = [chunk for chunk in response if chunk.choices]
        text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
        return text, details(chunks[-1].choices[0])

    answered, kept = run(1e6)
    abstained, refused = run(0.0)  # a random model is never sure of anything
    assert abstained == "I do not know." and refused["abstain"]["abstained"] is True
    assert answered != abstained and kept["abstain"]["abstained"] is False
    assert kept["uncertainty"] == refused["uncertainty"] == kept["abstain"]["uncertainty"]
    assert kept["uncertainty"]["nll"] > 0 and 0 < kept["uncertainty"]["min_top1_probability"] < 1


@pytest.mark.parametrize("stream", [False, True])
def test_abstain_falls_back_to_a_profile(client: openai.OpenAI, stream: bool):
    response = client.chat.completions.create(
        model="tiny-chat-unsure", messages=MESSAGES, max_tokens=5, temperature=1.0, seed=3, stream=stream,
        stream_options={"include_usage": True} if stream else None, extra_body={"alignment": {"return_details": True}},
    )  # fmt: skip
    if stream:
        chunks = list(response)
        record, usage = details([c for c in chunks if c.choices][-1].choices[0]), chunks[-1].usage
    else:
        record, usage = details(response.choices[0]), response.usage
    assert record["abstain"]["abstained"] is True and record["abstain"]["fallback"] == "tiny-chat-safe"
    assert len(record["best_of_n"]["candidates"]) == 4 and "guidelines" in record  # the fallback's methods
    assert usage is not None and usage.model_extra["alignment"]["engine_calls"] >= 2  # the measurement, then it


@pytest.mark.parametrize(
    ("fallback", "reason"), [("no-such-profile", "not a served model"), ("tiny-chat-unsure", "falls back itself")]
)
def test_a_fallback_that_cannot_answer_is_a_400(server: LocalGateway, fallback: str, reason: str):
    alignment = {"abstain": {"threshold": 0, "fallback": fallback}}
    body = {"model": "tiny-chat", "messages": MESSAGES, "alignment": alignment}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == "alignment.abstain.fallback"
    assert reason in response.json()["error"]["message"]


def test_early_rejection_is_best_of_n_at_rate_0_and_cheaper_above(client: openai.OpenAI):
    def run(alignment: dict[str, Any]) -> Any:
        return client.completions.create(
            model="tiny-base", prompt="def add(a, b):", max_tokens=16, seed=4, temperature=1.0,
            extra_body={"alignment": {**alignment, "return_details": True}},
        )  # fmt: skip

    best = run({"best_of_n": {"n": 8, "reward": "rm"}})
    same = run({"early_rejection": {"n": 8, "reward": "rm", "rejection_rate": 0}})
    early = run({"early_rejection": {"n": 8, "reward": "rm", "first_checkpoint": 4, "rejection_rate": 0.75}})
    assert same.choices[0].text == best.choices[0].text
    record = details(early.choices[0])["early_rejection"]
    assert record["checkpoints"][0] == {"tokens": 4, "running": 8, "kept": record["checkpoints"][0]["kept"]}
    assert len(record["checkpoints"][0]["kept"]) == 2
    assert early.usage is not None and best.usage is not None
    assert early.usage.completion_tokens < best.usage.completion_tokens


def test_early_rejection_with_a_strategy_is_a_400(server: LocalGateway):
    body = {"model": "tiny-base", "prompt": "x",
            "alignment": {"early_rejection": {"n": 4, "reward": "rm"}, "nudging": {"nudger": "tiny-chat"}}}  # fmt: skip
    response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == "alignment.early_rejection"
