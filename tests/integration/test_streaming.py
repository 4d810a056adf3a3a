"""Every method and combination answers the same streamed and not streamed (same seed): text, finish
reason, usage and details. A stream is the incremental view of the non-streaming result.

ASAp learns across requests, so its trie is dropped before each of the two requests (the admin route);
on vLLM workers the tries live in the workers, so there the grammar cases are GCD.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from evaluation.gateway import LocalGateway
from tests.integration.test_admission import metric
from tests.integration.test_grammar import YES_NO

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How do I pick a strong password?"}]
CUT_OFF = {"syntax": "regex", "grammar": "(yes indeed, )+done", "mode": "gcd"}  # cannot finish in 3 tokens
TRANSFER_Q = {"baseline": "tiny-chat-shared", "reward": "rm", "top_k": 3, "rollout_tokens": 3}
NUDGING = {"nudger": "tiny-chat", "gamma": 0.4, "temperature": 0.8}

Case = tuple[str, dict[str, Any]]
CASES: dict[str, Case] = {
    "plain": ("completions", {"model": "tiny-base", "prompt": "def parse(text):", "n": 2, "logprobs": 2}),
    "plain-chat": ("chat", {"model": "tiny-chat", "messages": CHAT, "logprobs": True, "top_logprobs": 2}),
    "grammar-cut-off": ("completions", {"model": "tiny-base", "prompt": "x", "max_tokens": 3, "seed": 3,
                                        "alignment": {"grammar": CUT_OFF}}),
    "grammar-gcd": ("completions", {"model": "tiny-base", "prompt": "Answer:", "n": 3,
                                    "alignment": {"grammar": {**YES_NO, "mode": "gcd"}}}),
    "grammar-asap": ("completions", {"model": "tiny-base", "prompt": "Answer:", "n": 3,
                                     "alignment": {"grammar": {**YES_NO, "mode": "asap"}}}),
    "response-format": ("chat", {"model": "tiny-chat", "messages": CHAT, "max_tokens": 24,
                                 "response_format": {"type": "json_object"}}),
    "guidelines": ("chat", {"model": "tiny-chat", "messages": CHAT, "alignment": {"guidelines": {"top_k": 2}}}),
    "best-of-n": ("completions", {"model": "tiny-base", "prompt": "def f():", "n": 2,
                                  "alignment": {"best_of_n": {"n": 4, "reward": "rm"}}}),
    "guidelines-best-of-n": ("chat", {"model": "tiny-chat", "messages": CHAT, "alignment": {
        "guidelines": {"top_k": 2}, "best_of_n": {"n": 3, "reward": "rm"}}}),
    "gcd-best-of-n": ("completions", {"model": "tiny-base", "prompt": "Answer:", "alignment": {
        "grammar": {**YES_NO, "mode": "gcd"}, "best_of_n": {"n": 3, "reward": "rm"}}}),
    "asap-best-of-n": ("completions", {"model": "tiny-base", "prompt": "Answer:", "alignment": {
        "grammar": {**YES_NO, "mode": "asap"}, "best_of_n": {"n": 3, "reward": "rm"}}}),
    "nudging": ("chat", {"model": "tiny-base", "messages": CHAT, "alignment": {"nudging": NUDGING}}),
    "nudging-best-of-n-guidelines": ("completions", {
        "model": "tiny-base", "prompt": "Question: how do I sort a list?\nAnswer:",
        "alignment": {"guidelines": {"top_k": 2}, "nudging": NUDGING, "best_of_n": {"n": 2, "reward": "rm"}},
    }),
    "transfer-q": ("completions", {"model": "tiny-base", "prompt": "def sort(items):", "max_tokens": 4,
                                   "alignment": {"transfer_q": TRANSFER_Q}}),
    "transfer-q-guidelines": ("chat", {"model": "tiny-chat-shared", "messages": CHAT, "max_tokens": 4,
                                       "alignment": {"guidelines": {"top_k": 1}, "transfer_q": TRANSFER_Q}}),
}  # fmt: skip
ON_VLLM = ("plain", "plain-chat", "grammar-cut-off", "grammar-gcd", "response-format", "gcd-best-of-n")


def body_of(case: Case, stream: bool) -> dict[str, Any]:
    """The request as the `openai` client takes it: alignd's extension in `extra_body`."""
    body = {"max_tokens": 12, "seed": 7, **case[1], "stream": stream}
    body["extra_body"] = {"alignment": {**body.pop("alignment", {}), "return_details": True}}
    return body | ({"stream_options": {"include_usage": True}} if stream else {})


def answered(server: LocalGateway, case: Case, *, stream: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per choice: text, finish reason, details (and logprobs' tokens); and the usage."""
    route, body = case[0], body_of(case, stream)
    httpx.delete(f"{server.url}/admin/grammar/tries", timeout=30)
    client = server.client()
    create = client.completions.create if route == "completions" else client.chat.completions.create
    if not stream:
        response = create(**body)
        return [choice_of(route, c) for c in response.choices], response.usage.model_dump()  # type: ignore[union-attr]
    choices: dict[int, dict[str, Any]] = {}
    usage: dict[str, Any] = {}
    for chunk in create(**body):
        usage = chunk.usage.model_dump() if chunk.usage else usage
        for part in chunk.choices:
            merged = choices.setdefault(part.index, {"text": "", "finish_reason": None, "details": None, "tokens": []})
            piece = choice_of(route, part, delta=True)
            merged["text"] += piece["text"]
            merged["tokens"] += piece["tokens"]
            merged["finish_reason"] = piece["finish_reason"] or merged["finish_reason"]
            if piece["details"] is not None:
                merged["details"] = piece["details"]
    return [choices[i] for i in sorted(choices)], usage


def choice_of(route: str, choice: Any, *, delta: bool = False) -> dict[str, Any]:
    if route == "completions":
        text, tokens = choice.text, (choice.logprobs.tokens if choice.logprobs else [])
    else:
        text = (choice.delta.content if delta else choice.message.content) or ""
        tokens = [t.token for t in choice.logprobs.content] if choice.logprobs and choice.logprobs.content else []
    details = (choice.model_extra or {}).get("alignment")
    return {"text": text, "finish_reason": choice.finish_reason, "details": details, "tokens": tokens}


def assert_same_answer(server: LocalGateway, name: str) -> None:
    plain, plain_usage = answered(server, CASES[name], stream=False)
    streamed, streamed_usage = answered(server, CASES[name], stream=True)
    assert streamed == plain and streamed_usage == plain_usage


@pytest.mark.parametrize("name", ON_VLLM)
def test_a_stream_answers_what_the_request_answers(stack: LocalGateway, name: str):
    assert_same_answer(stack, name)


@pytest.mark.parametrize("name", [name for name in CASES if name not in ON_VLLM])
def test_a_stream_answers_what_the_request_answers_in_process(server: LocalGateway, name: str):
    assert_same_answer(server, name)


def test_a_grammar_cut_off_streams_as_a_length_finish_with_its_details(server: LocalGateway):
    """The case measured on main: streamed, it said `stop` and dropped the details."""
    (choice,), _ = answered(server, CASES["grammar-cut-off"], stream=True)
    assert choice["finish_reason"] == "length" and choice["details"]["grammar"]["complete"] is False


def test_the_time_to_first_token_counts_from_the_request(server: LocalGateway):
    """Best-of-4 streams its winner once all four are scored: the first token comes that late, and the
    metric says so (it once counted from the first event, after the wait)."""
    name = 'alignd_time_to_first_token_seconds_sum{model="tiny-base",route="/v1/completions"}'
    before = metric(server, name)
    body = {"model": "tiny-base", "prompt": "def f(x):", "max_tokens": 24, "seed": 3, "stream": True,
            "alignment": {"best_of_n": {"n": 4, "reward": "rm"}}}  # fmt: skip
    started = time.perf_counter()
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        seen_by_client = time.perf_counter() - started
        assert "data: [DONE]" in list(lines)
    assert first and response.status_code == 200
    measured = metric(server, name) - before
    assert 0.5 * seen_by_client <= measured <= seen_by_client + 0.05, (measured, seen_by_client)
