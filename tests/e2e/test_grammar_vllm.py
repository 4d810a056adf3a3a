"""Grammar inside vLLM CPU workers (alignd's plugin): trie-key routing, the worker's own admission check.
What holds on both engines is in ``tests/integration/test_grammar.py`` and ``test_streaming.py``."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai

from decoding.grammar import WORKER_ARG
from evaluation.gateway import LocalGateway
from tests.e2e.test_alignment_vllm import worker_metric
from tests.integration.test_grammar import YES_NO


async def test_requests_with_one_trie_key_go_to_one_replica(
    vllm_gateway: LocalGateway, async_client: openai.AsyncOpenAI
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


def test_a_bad_grammar_is_a_400_from_the_gateway_and_from_the_worker(vllm_gateway: LocalGateway):
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
