"""The gateway in front of real vLLM CPU workers it launched itself."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from evaluation.gateway import LocalGateway
from models.engine import SamplingParams
from models.hf import HFEngine
from models.scorers import HFRewardScorer, VLLMRewardScorer
from models.vllm_service import VLLMService

MESSAGES = [{"role": "user", "content": "Name a colour."}]


def replicas(gateway: LocalGateway, model: str) -> list[dict[str, Any]]:
    return httpx.get(f"{gateway.url}/ready", timeout=5).json()["models"][model]["replicas"]


def worker_metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(f"{name}{{"))


def wait_until(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.25)
    raise AssertionError(f"not within {timeout} s: {what}")


def test_completion_with_n_and_logprobs(client: openai.OpenAI):
    completion = client.completions.create(
        model="tiny-base", prompt="def main():", max_tokens=6, n=3, logprobs=2, seed=1
    )
    assert sorted(choice.index for choice in completion.choices) == [0, 1, 2]
    for choice in completion.choices:
        assert choice.logprobs is not None and choice.logprobs.top_logprobs is not None
        assert len(choice.logprobs.tokens or []) == len(choice.logprobs.top_logprobs) > 0
    assert completion.usage is not None and completion.usage.completion_tokens == 3 * 6


def test_chat_and_streaming_chat(client: openai.OpenAI):
    chat = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=8, temperature=0)
    stream = client.chat.completions.create(
        model="tiny-chat", messages=MESSAGES, max_tokens=8, temperature=0, stream=True
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed == chat.choices[0].message.content
    assert chat.usage is not None and chat.usage.completion_tokens <= 8


async def test_async_concurrent_requests_with_seed(async_client: openai.AsyncOpenAI):
    async def ask(seed: int) -> str:
        completion = await async_client.completions.create(model="tiny-base", prompt="x =", max_tokens=8, seed=seed)
        return completion.choices[0].text

    first = await asyncio.gather(*(ask(seed) for seed in range(6)))
    again = await asyncio.gather(*(ask(seed) for seed in range(6)))
    assert first == again
    assert len(set(first)) > 1


async def test_logprobs_agree_with_the_in_process_engine(client: openai.OpenAI, tiny_models: Path):
    """The same weights on vLLM and in transformers: echoed prompt logprobs match."""
    prompt = "import json\n\ndef load(path):\n    return"
    remote = client.completions.create(model="tiny-base", prompt=prompt, max_tokens=1, echo=True, logprobs=1)
    local = await HFEngine("tiny-base", tiny_models / "base").generate(
        prompt, SamplingParams(max_tokens=1, prompt_logprobs=1)
    )
    assert local.prompt_logprobs is not None
    expected = [record.logprob if record else None for record in local.prompt_logprobs]
    got = (remote.choices[0].logprobs.token_logprobs or [])[: len(expected)]  # type: ignore[union-attr]
    assert got[0] is None and expected[0] is None
    assert got[1:] == pytest.approx(expected[1:], abs=2e-3)


async def test_reward_scoring_through_a_pooling_worker(vllm_gateway: LocalGateway, tiny_models: Path):
    pairs = [("Question: 2+2?\n", "4"), ("Say hi.\n", "Hello there, friend."), ("x", "")]
    service = await VLLMService.connect("rm", [replicas(vllm_gateway, "rm")[0]["url"]])
    remote = await VLLMRewardScorer("rm", service, served_name="rm").score(pairs)
    await service.close()
    local = await HFRewardScorer("rm", tiny_models / "reward").score(pairs)
    assert remote == pytest.approx(local, abs=2e-3)


async def test_unrelated_requests_spread_over_both_replicas(
    vllm_gateway: LocalGateway, async_client: openai.AsyncOpenAI
):
    urls = [replica["url"] for replica in replicas(vllm_gateway, "tiny-base")]
    before = [worker_metric(url, "vllm:request_success_total") for url in urls]
    await asyncio.gather(
        *(async_client.completions.create(model="tiny-base", prompt="for i in", max_tokens=24) for _ in range(8))
    )
    served = [worker_metric(url, "vllm:request_success_total") - b for url, b in zip(urls, before, strict=True)]
    assert sum(served) == 8
    assert min(served) >= 2


@contextlib.contextmanager
def raw_request(gateway: LocalGateway, body: dict[str, Any]) -> Iterator[socket.socket]:
    """POSTs ``body`` to ``/v1/completions`` on a raw socket; leaving the block hangs up unanswered."""
    payload = json.dumps(body).encode()
    head = "POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: "
    with socket.create_connection(("127.0.0.1", gateway.port)) as connection:
        connection.sendall(f"{head}{len(payload)}\r\n\r\n".encode() + payload)
        yield connection


def worker_log_count(gateway: LocalGateway, model: str, text: str) -> int:
    """How often ``text`` occurs in the logs of ``model``'s managed workers."""
    logs = (gateway.log_path.parent / "workers").glob(f"{model}-*.log")
    return sum(path.read_text(errors="replace").count(text) for path in logs)


LONG_REQUEST = {"model": "tiny-base", "prompt": "x", "max_tokens": 2000, "seed": 7}


def generated_tokens(gateway: LocalGateway) -> float:
    return sum(worker_metric(r["url"], "vllm:generation_tokens_total") for r in replicas(gateway, "tiny-base"))


def wait_idle(gateway: LocalGateway) -> None:
    urls = [replica["url"] for replica in replicas(gateway, "tiny-base")]
    wait_until(lambda: sum(worker_metric(url, "vllm:num_requests_running") for url in urls) == 0, 60, "idle")


@pytest.fixture(scope="module")
def full_request_tokens(vllm_gateway: LocalGateway) -> float:
    """What ``LONG_REQUEST`` generates upstream when nobody hangs up (8-24 s of generation here)."""
    before = generated_tokens(vllm_gateway)
    httpx.post(f"{vllm_gateway.url}/v1/completions", json=LONG_REQUEST, timeout=180).raise_for_status()
    wait_idle(vllm_gateway)
    return generated_tokens(vllm_gateway) - before


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-streaming"])
def test_disconnect_aborts_the_upstream_request(vllm_gateway: LocalGateway, full_request_tokens: float, stream: bool):
    """A client that hangs up stops the generation upstream: vLLM aborts the request, which generates
    fewer tokens than the same seeded request run to its end.

    The waits read the workers' logs (``--enable-log-requests``), not their /metrics: a metrics scrape
    costs the cores the generation runs on, and on 2 cores a busy vLLM CPU worker can stall every
    process for seconds, so the abort is checked by its outcome, not against a deadline.
    """

    def logged(text: str) -> int:
        return worker_log_count(vllm_gateway, "tiny-base", text)

    added, aborted = logged("Added request"), logged("Aborted request")
    before = generated_tokens(vllm_gateway)
    with raw_request(vllm_gateway, {**LONG_REQUEST, "stream": stream}):
        wait_until(lambda: logged("Added request") > added, 60, "the worker started the request")
    wait_until(lambda: logged("Aborted request") > aborted, 60, "the worker aborted the request")
    wait_idle(vllm_gateway)
    assert generated_tokens(vllm_gateway) - before < full_request_tokens


def test_worker_errors_reach_the_client_as_400(client: openai.OpenAI):
    # Passes the gateway's checks but not the (stricter) worker's: vLLM's own message comes back.
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="tiny-chat", messages=MESSAGES, max_tokens=2, logprobs=True, top_logprobs=3
        )
    assert "worker rejected" in info.value.message and "max allowed: 2" in info.value.message


def test_failover_503_and_recovery(vllm_gateway: LocalGateway, client: openai.OpenAI):
    """Kill one base replica and the only chat worker mid-run: base requests keep succeeding on the
    other replica, chat answers 503 at once; both come back when the supervisor restarts them."""
    victim = replicas(vllm_gateway, "tiny-base")[0]
    chat_pid = replicas(vllm_gateway, "tiny-chat")[0]["pid"]
    results: list[str] = []

    async def load() -> None:
        async with vllm_gateway.async_client() as aclient:
            for _ in range(12):
                completion = await aclient.completions.create(model="tiny-base", prompt="while", max_tokens=16)
                results.append(completion.choices[0].finish_reason)

    async def kill_meanwhile() -> None:
        await asyncio.sleep(0.3)
        os.killpg(victim["pid"], signal.SIGKILL)
        os.killpg(chat_pid, signal.SIGKILL)

    async def run() -> None:
        await asyncio.gather(load(), kill_meanwhile())

    asyncio.run(run())
    assert len(results) == 12

    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as down:
        client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=2)
    assert down.value.status_code == 503 and time.monotonic() - started < 10
    # Streamed too: the status says it, before any 200 (found by the chaos run: was a 200 and an error event).
    body = {"model": "tiny-chat", "messages": MESSAGES, "max_tokens": 2, "stream": True}
    streamed = httpx.post(f"{vllm_gateway.url}/v1/chat/completions", json=body, timeout=10)
    assert streamed.status_code == 503 and streamed.json()["error"]["code"] == "engine_unavailable"

    def recovered() -> bool:
        base = {r["url"]: r for r in replicas(vllm_gateway, "tiny-base")}[victim["url"]]
        chat = replicas(vllm_gateway, "tiny-chat")[0]
        return bool(base["healthy"] and chat["healthy"] and base["pid"] != victim["pid"])

    wait_until(recovered, 240, "the killed workers were restarted and are healthy again")
    chat = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=2)
    assert chat.choices[0].finish_reason in ("stop", "length")
