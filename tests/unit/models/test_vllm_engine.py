"""The vLLM engine and service against a scripted vLLM server (httpx.MockTransport)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from models.engine import SamplingParams
from models.errors import EngineUnavailableError, InvalidRequestError, UpstreamError
from models.scorers import VLLMRewardScorer
from models.tokenizer import Tokenizer
from models.vllm_engine import VLLMEngine
from models.vllm_service import VLLMService

Handler = Callable[[httpx.Request], httpx.Response]


def completion_choice(index: int, token_ids: list[int], **extra: Any) -> dict[str, Any]:
    top = [{f"token_id:{t}": -1.0 - i, "token_id:7": -0.5, "token_id:8": -3.0} for i, t in enumerate(token_ids)]
    logprobs = {
        "tokens": [f"token_id:{t}" for t in token_ids],
        "token_logprobs": [-1.0 - i for i in range(len(token_ids))],
        "top_logprobs": top,
        "text_offset": [0] * len(token_ids),
    }
    return {"index": index, "text": "t" * len(token_ids), "token_ids": token_ids, "logprobs": logprobs,
            "finish_reason": "length", **extra}  # fmt: skip


def scripted(handler: Handler) -> Callable[[httpx.Request], httpx.Response]:
    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(200)
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "served", "max_model_len": 512}]})
        return handler(request)

    return handle


async def engine_with(tiny_models: Path, handler: Handler, urls: tuple[str, ...] = ("http://w:1",)) -> VLLMEngine:
    client = httpx.AsyncClient(transport=httpx.MockTransport(scripted(handler)))
    service = await VLLMService.connect("m", list(urls), client=client)
    tokenizer = Tokenizer(tiny_models / "base", name="m")
    return await VLLMEngine.create("m", tokenizer, service, served_name="served", max_logprobs=20)


async def test_generate_sends_token_ids_and_reads_vllm_logprobs(tiny_models: Path):
    sent: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        sent.append(body)
        prompt_logprobs = [None] + [{str(t): {"logprob": -2.0, "rank": 3}, "9": {"logprob": -0.1, "rank": 1}}
                                    for t in body["prompt"][1:]]  # fmt: skip
        choices = [completion_choice(1, [5, 6]), completion_choice(0, [3, 4], prompt_logprobs=prompt_logprobs)]
        return httpx.Response(200, json={"choices": choices})

    engine = await engine_with(tiny_models, handler)
    params = SamplingParams(max_tokens=2, n=2, logprobs=1, prompt_logprobs=1, seed=3, stop=("x",))
    completion = await engine.generate([10, 11, 12], params)
    await engine.close()
    assert sent[0]["prompt"] == [10, 11, 12] and sent[0]["model"] == "served"
    assert sent[0]["return_tokens_as_token_ids"] and sent[0]["n"] == 2 and sent[0]["seed"] == 3
    assert engine.info.max_model_len == 512
    assert [s.token_ids for s in completion.samples] == [[3, 4], [5, 6]]
    first = completion.samples[0].logprobs
    assert first is not None and first[0].token_id == 3 and first[0].logprob == -1.0
    assert [alt.token_id for alt in first[0].top] == [7]  # the best 1 of the alternatives
    assert completion.prompt_logprobs is not None and completion.prompt_logprobs[0] is None
    record = completion.prompt_logprobs[1]
    assert record is not None and (record.token_id, record.logprob) == (11, -2.0)
    assert [alt.token_id for alt in record.top] == [9]


async def test_a_batch_gets_each_prompts_own_prompt_logprobs(tiny_models: Path):
    def handler(request: httpx.Request) -> httpx.Response:
        prompts = json.loads(request.content)["prompt"]
        choices = [completion_choice(i, [3], prompt_logprobs=[None] + [{str(t): {"logprob": -float(i + 1), "rank": 1}}
                                                                      for t in prompt[1:]])
                   for i, prompt in enumerate(prompts)]  # fmt: skip
        return httpx.Response(200, json={"choices": choices})

    engine = await engine_with(tiny_models, handler)
    first, second = await engine.generate_batch(
        [[10, 11], [20, 21, 22]], SamplingParams(max_tokens=1, prompt_logprobs=0)
    )
    await engine.close()
    assert first.prompt_logprobs is not None and second.prompt_logprobs is not None
    assert [(r.token_id, r.logprob) for r in first.prompt_logprobs[1:] if r] == [(11, -1.0)]
    assert [(r.token_id, r.logprob) for r in second.prompt_logprobs[1:] if r] == [(21, -2.0), (22, -2.0)]


async def test_stream_yields_deltas_until_done(tiny_models: Path):
    def handler(request: httpx.Request) -> httpx.Response:
        events = [
            {"choices": [{"index": 0, "text": "a", "token_ids": [1], "finish_reason": None}]},
            {"choices": [{"index": 0, "text": "b", "token_ids": [2], "finish_reason": "stop"}]},
        ]
        body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    engine = await engine_with(tiny_models, handler)
    deltas = [delta async for delta in engine.stream([1, 2], SamplingParams(max_tokens=2))]
    await engine.close()
    assert ["".join(d.text for d in deltas), deltas[-1].finish_reason] == ["ab", "stop"]


@pytest.mark.parametrize(
    ("status", "error", "expected"),
    [
        (400, {"error": {"message": "bad seed", "param": "seed"}}, InvalidRequestError),
        (422, {"detail": "unprocessable"}, InvalidRequestError),
        (500, {"error": {"message": "engine died"}}, UpstreamError),
        (503, {"error": {"message": "overloaded"}}, UpstreamError),
    ],
)
async def test_worker_errors_are_translated(tiny_models: Path, status: int, error: dict[str, Any], expected: type):
    engine = await engine_with(tiny_models, lambda request: httpx.Response(status, json=error))
    with pytest.raises(expected) as info:
        await engine.generate([1], SamplingParams(max_tokens=1))
    await engine.close()
    assert info.value.status_code == (400 if status < 500 else 502)
    assert str(error.get("error", error).get("message", "unprocessable")) in info.value.message


async def test_an_error_event_in_a_stream_is_raised(tiny_models: Path):
    def handler(request: httpx.Request) -> httpx.Response:
        body = 'data: {"error": {"message": "boom"}}\n\ndata: [DONE]\n\n'
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    engine = await engine_with(tiny_models, handler)
    with pytest.raises(UpstreamError, match="boom"):
        async for _ in engine.stream([1], SamplingParams(max_tokens=1)):
            pass
    await engine.close()


async def test_unreachable_replica_fails_over_then_503(tiny_models: Path):
    dead = {"a"}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host in dead:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, json={"choices": [completion_choice(0, [1])]})

    engine = await engine_with(tiny_models, handler, urls=("http://a:1", "http://b:1"))
    completion = await engine.generate([1], SamplingParams(max_tokens=1))
    assert completion.samples[0].token_ids == [1]
    dead.add("b")
    engine.service.replicas.replicas[1].healthy = True
    with pytest.raises(EngineUnavailableError):
        await engine.generate([1], SamplingParams(max_tokens=1))
    await engine.close()


async def test_reward_scorer_makes_one_batched_pooling_call():
    calls: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        calls.append(body)
        data = [{"index": i, "data": [float(len(text))]} for i, text in enumerate(body["input"])]
        return httpx.Response(200, json={"data": list(reversed(data))})

    client = httpx.AsyncClient(transport=httpx.MockTransport(scripted(handler)))
    service = await VLLMService.connect("rm", ["http://r:1"], client=client)
    scorer = VLLMRewardScorer("rm", service, served_name="rm", template="Q:{prompt} A:{response}")
    scores = await scorer.score([("a", "b"), ("long prompt", "long response")])
    await scorer.close()
    assert len(calls) == 1 and calls[0]["use_activation"] is False
    assert calls[0]["input"] == ["Q:a A:b", "Q:long prompt A:long response"]
    assert scores == [7.0, 29.0]
