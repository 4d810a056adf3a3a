"""The vLLM engine and service against scripted vLLM servers (aiohttp servers on loopback)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from models.engine import SamplingParams
from models.errors import EngineUnavailableError, InvalidRequestError, UpstreamError
from models.scorers import VLLMRewardScorer
from models.tokenizer import Tokenizer
from models.vllm_engine import VLLMEngine
from models.vllm_service import VLLMService
from models.workers import free_port

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Serve = Callable[[Handler], Awaitable[TestServer]]


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


async def sse(request: web.Request, events: list[Any]) -> web.StreamResponse:
    """Events as vLLM streams them: a chunked body, one write per event, ``[DONE]``, then the body's end."""
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    for data in [*(json.dumps(event) for event in events), "[DONE]"]:
        await response.write(f"data: {data}\n\n".encode())
        await asyncio.sleep(0.01)
    await response.write_eof()
    return response


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Starts a scripted vLLM server: ``/health`` and ``/v1/models`` answered, everything else by ``handler``."""
    servers: list[TestServer] = []

    async def start(handler: Handler) -> TestServer:
        async def handle(request: web.Request) -> web.StreamResponse:
            if request.path == "/health":
                return web.Response()
            if request.path == "/v1/models":
                return web.json_response({"data": [{"id": "served", "max_model_len": 512}]})
            return await handler(request)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()


def url_of(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


async def engine_with(tiny_models: Path, serve: Serve, handler: Handler) -> VLLMEngine:
    service = await VLLMService.connect("m", [url_of(await serve(handler))])
    return await engine_on(tiny_models, service)


async def engine_on(tiny_models: Path, service: VLLMService) -> VLLMEngine:
    tokenizer = Tokenizer(tiny_models / "base", name="m")
    return await VLLMEngine.create("m", tokenizer, service, served_name="served", max_logprobs=20)


async def test_generate_sends_token_ids_and_reads_vllm_logprobs(tiny_models: Path, serve: Serve):
    sent: list[dict[str, Any]] = []

    async def handler(request: web.Request) -> web.Response:
        body = await request.json()
        sent.append(body)
        prompt_logprobs = [None] + [{str(t): {"logprob": -2.0, "rank": 3}, "9": {"logprob": -0.1, "rank": 1}}
                                    for t in body["prompt"][1:]]  # fmt: skip
        choices = [completion_choice(1, [5, 6]), completion_choice(0, [3, 4], prompt_logprobs=prompt_logprobs)]
        return web.json_response({"choices": choices})

    engine = await engine_with(tiny_models, serve, handler)
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


async def test_a_batch_gets_each_prompts_own_prompt_logprobs(tiny_models: Path, serve: Serve):
    async def handler(request: web.Request) -> web.Response:
        prompts = (await request.json())["prompt"]
        choices = [completion_choice(i, [3], prompt_logprobs=[None] + [{str(t): {"logprob": -float(i + 1), "rank": 1}}
                                                                      for t in prompt[1:]])
                   for i, prompt in enumerate(prompts)]  # fmt: skip
        return web.json_response({"choices": choices})

    engine = await engine_with(tiny_models, serve, handler)
    first, second = await engine.generate_batch(
        [[10, 11], [20, 21, 22]], SamplingParams(max_tokens=1, prompt_logprobs=0)
    )
    await engine.close()
    assert first.prompt_logprobs is not None and second.prompt_logprobs is not None
    assert [(r.token_id, r.logprob) for r in first.prompt_logprobs[1:] if r] == [(11, -1.0)]
    assert [(r.token_id, r.logprob) for r in second.prompt_logprobs[1:] if r] == [(21, -2.0), (22, -2.0)]


async def test_stream_yields_deltas_until_done(tiny_models: Path, serve: Serve):
    async def handler(request: web.Request) -> web.StreamResponse:
        return await sse(request, [
            {"choices": [{"index": 0, "text": "a", "token_ids": [1], "finish_reason": None}]},
            {"choices": [{"index": 0, "text": "b", "token_ids": [2], "finish_reason": "stop"}]},
        ])  # fmt: skip

    engine = await engine_with(tiny_models, serve, handler)
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
async def test_worker_errors_are_translated(
    tiny_models: Path, serve: Serve, status: int, error: dict[str, Any], expected: type
):
    async def handler(request: web.Request) -> web.Response:
        return web.json_response(error, status=status)

    engine = await engine_with(tiny_models, serve, handler)
    with pytest.raises(expected) as info:
        await engine.generate([1], SamplingParams(max_tokens=1))
    await engine.close()
    assert info.value.status_code == (400 if status < 500 else 502)
    assert str(error.get("error", error).get("message", "unprocessable")) in info.value.message


async def test_an_error_event_in_a_stream_is_raised(tiny_models: Path, serve: Serve):
    async def handler(request: web.Request) -> web.StreamResponse:
        return await sse(request, [{"error": {"message": "boom"}}])

    engine = await engine_with(tiny_models, serve, handler)
    with pytest.raises(UpstreamError, match="boom"):
        async for _ in engine.stream([1], SamplingParams(max_tokens=1)):
            pass
    await engine.close()


async def test_unreachable_replica_fails_over_then_503(tiny_models: Path, serve: Serve):
    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"choices": [completion_choice(0, [1])]})

    alive = await serve(handler)
    nobody = f"http://127.0.0.1:{free_port()}"  # refuses connections
    engine = await engine_on(tiny_models, await VLLMService.connect("m", [nobody, url_of(alive)]))
    engine.service.replicas.replicas[0].healthy = True  # as if it had died since its last health check
    completion = await engine.generate([1], SamplingParams(max_tokens=1))
    assert completion.samples[0].token_ids == [1]
    assert not engine.service.replicas.replicas[0].healthy
    await alive.close()
    engine.service.replicas.replicas[1].healthy = True
    with pytest.raises(EngineUnavailableError):
        await engine.generate([1], SamplingParams(max_tokens=1))
    await engine.close()


async def test_streams_reuse_pooled_connections(tiny_models: Path, serve: Serve):
    """The stream is read past ``[DONE]`` to its end, so its connection goes back to the pool (which the
    health checks share, so a stream may find the one connection busy with a check)."""
    peers: set[Any] = set()

    async def handler(request: web.Request) -> web.StreamResponse:
        peers.add(request.transport.get_extra_info("peername") if request.transport else None)
        return await sse(request, [{"choices": [{"index": 0, "text": "a", "token_ids": [1], "finish_reason": "stop"}]}])

    engine = await engine_with(tiny_models, serve, handler)
    for _ in range(10):
        assert [d.text async for d in engine.stream([1], SamplingParams(max_tokens=1))] == ["a"]
    await engine.close()
    assert len(peers) <= 2


async def test_reward_scorer_makes_one_batched_pooling_call(serve: Serve):
    calls: list[dict[str, Any]] = []

    async def handler(request: web.Request) -> web.Response:
        body = await request.json()
        calls.append(body)
        data = [{"index": i, "data": [float(len(text))]} for i, text in enumerate(body["input"])]
        return web.json_response({"data": list(reversed(data))})

    service = await VLLMService.connect("rm", [url_of(await serve(handler))])
    scorer = VLLMRewardScorer("rm", service, served_name="rm", template="Q:{prompt} A:{response}")
    scores = await scorer.score([("a", "b"), ("long prompt", "long response")])
    await scorer.close()
    assert len(calls) == 1 and calls[0]["use_activation"] is False
    assert calls[0]["input"] == ["Q:a A:b", "Q:long prompt A:long response"]
    assert scores == [7.0, 29.0]


async def test_events_split_across_reads_and_spelled_with_crlf_are_parsed(tiny_models: Path, serve: Serve):
    """SSE as the format allows it, not only as vLLM writes it: CRLF line ends, comments, an event cut in the
    middle by the network, data split over two lines."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        first = json.dumps({"choices": [{"index": 0, "text": "a", "token_ids": [1], "finish_reason": None}]})
        second = json.dumps({"choices": [{"index": 0, "text": "b", "token_ids": [2], "finish_reason": "stop"}]})
        for piece in [": keep-alive\r\n\r\ndata: ", first[:10], first[10:] + "\r\n\r\n",
                      f"data: {second[:12]}\ndata: {second[12:]}\n\n", "data: [DONE]\n\n"]:  # fmt: skip
            await response.write(piece.encode())
            await asyncio.sleep(0.01)
        await response.write_eof()
        return response

    engine = await engine_with(tiny_models, serve, handler)
    deltas = [delta async for delta in engine.stream([1, 2], SamplingParams(max_tokens=2))]
    await engine.close()
    assert [(d.text, d.token_ids) for d in deltas] == [("a", [1]), ("b", [2])]
