"""The e2e tests talk to ``vllm_gateway`` (``tests/conftest.py``): the gateway with managed vLLM CPU workers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import openai
import pytest

from evaluation.gateway import LocalGateway


@pytest.fixture
def client(vllm_gateway: LocalGateway) -> Iterator[openai.OpenAI]:
    with vllm_gateway.client() as live:
        yield live


@pytest.fixture
async def async_client(vllm_gateway: LocalGateway) -> AsyncIterator[openai.AsyncOpenAI]:
    async with vllm_gateway.async_client() as live:
        yield live
