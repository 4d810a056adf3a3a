"""Grammar-constrained and grammar-aligned sampling inside vLLM CPU workers (alignd's plugin)."""

from __future__ import annotations

import asyncio
import json

import httpx
import jsonschema
import openai
import pytest

from decoding.grammar import WORKER_ARG
from server.testing import RemoteAligndServer
from tests.e2e.test_alignment_vllm import details, worker_metric
from tests.integration.test_grammar import SCHEMA, YES_NO, YES_NO_RE


@pytest.mark.parametrize("mode", ["asap", "gcd"])
def test_every_output_is_in_the_language(client: openai.OpenAI, mode: str):
    completion = client.completions.create(
        model="tiny-base",
        prompt="Answer:",
        max_tokens=40,
        n=4,
        seed=3,
        extra_body={"alignment": {"grammar": {**YES_NO, "mode": mode}, "return_details": True}},
    )
    assert any(details(choice)["grammar"]["complete"] for choice in completion.choices)
    for choice in completion.choices:
        if details(choice)["grammar"]["complete"]:
            assert YES_NO_RE.fullmatch(choice.text) and choice.finish_reason == "stop", choice.text
        else:
            assert choice.finish_reason == "length" and YES_NO_RE.match(choice.text + "yes") is not None


def test_json_schema_outputs_validate(client: openai.OpenAI):
    chat = client.chat.completions.create(
        model="tiny-chat",
        messages=[{"role": "user", "content": "Reply in JSON."}],
        max_tokens=96,
        n=4,
        seed=1,
        response_format={"type": "json_schema", "json_schema": {"name": "reply", "schema": SCHEMA}},
        extra_body={"alignment": {"return_details": True}},
    )
    complete = [choice for choice in chat.choices if details(choice)["grammar"]["complete"]]
    assert complete, [choice.message.content for choice in chat.choices]
    for choice in complete:
        jsonschema.validate(json.loads(choice.message.content or ""), SCHEMA)


def test_grammar_with_best_of_n(client: openai.OpenAI):
    completion = client.completions.create(
        model="tiny-base",
        prompt="Answer:",
        max_tokens=30,
        extra_body={"alignment": {"grammar": YES_NO, "best_of_n": {"n": 3, "reward": "rm"}, "return_details": True}},
    )
    record = details(completion.choices[0])
    assert len(record["best_of_n"]["candidates"]) == 3
    if record["grammar"]["complete"]:
        assert YES_NO_RE.fullmatch(completion.choices[0].text)


async def test_requests_with_one_trie_key_go_to_one_replica(
    vllm_gateway: RemoteAligndServer, async_client: openai.AsyncOpenAI
):
    """ASAp learns in the worker that holds the key's trie: concurrent requests for one key are
    not spread over the two replicas (unrelated requests are; see test_vllm_workers)."""
    ready = httpx.get(f"{vllm_gateway.url}/ready", timeout=5).json()["models"]
    urls = [replica["url"] for replica in ready["tiny-base"]["replicas"]]
    before = [worker_metric(url, "vllm:request_success_total") for url in urls]
    body = {"grammar": {**YES_NO, "mode": "asap"}}

    async def ask(seed: int) -> None:
        await async_client.completions.create(
            model="tiny-base", prompt="One key:", max_tokens=12, n=2, seed=seed, extra_body={"alignment": body}
        )

    await asyncio.gather(*(ask(seed) for seed in range(4)))
    served = sorted(worker_metric(url, "vllm:request_success_total") - b for url, b in zip(urls, before, strict=True))
    assert served == [0, 8]


def test_a_bad_grammar_is_a_400_from_the_gateway_and_from_the_worker(vllm_gateway: RemoteAligndServer):
    bad = {"syntax": "regex", "grammar": "(yes|no"}
    response = httpx.post(
        f"{vllm_gateway.url}/v1/completions",
        json={"model": "tiny-base", "prompt": "x", "max_tokens": 4, "alignment": {"grammar": bad}},
        timeout=30,
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "alignment.grammar.grammar"
    worker = httpx.get(f"{vllm_gateway.url}/ready", timeout=5).json()["models"]["tiny-base"]["replicas"][0]["url"]
    direct = httpx.post(
        f"{worker}/v1/completions",
        json={"model": "tiny-base", "prompt": [1, 2], "max_tokens": 4, "vllm_xargs": {WORKER_ARG: json.dumps(bad)}},
        timeout=30,
    )
    assert direct.status_code == 400 and "does not compile" in direct.text, direct.text
