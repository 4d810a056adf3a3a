"""The gateway's vLLM engine against the mock vLLM worker of ``loadtest/``: what the gateway benchmark
measures works through the HTTP API, and the gateway keeps its connections to the worker."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import yaml

from evaluation.gateway import LocalGateway
from loadtest.mock_vllm import MockWorker

PROMPT = list(range(5, 21))
# Smaller than the tiny tokenizer's 2,048, so that the gateway passes ids the worker refuses.
WORKER_VOCABULARY = 1024


@pytest.fixture(scope="module")
def mock() -> Iterator[MockWorker]:
    with MockWorker("mock", vocab_size=WORKER_VOCABULARY) as worker:
        yield worker


@pytest.fixture(scope="module")
def gateway(mock: MockWorker, tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalGateway]:
    directory = tmp_path_factory.mktemp("mock-gateway")
    config = directory / "alignd.yaml"
    config.write_text(yaml.safe_dump({"model_root": str(tiny_models), "models": [mock.served_model()]}))
    with LocalGateway(config, directory / "alignd.log") as live:
        yield live


@pytest.fixture(scope="module")
def client(gateway: LocalGateway) -> Iterator[openai.OpenAI]:
    with gateway.client() as live:
        yield live


def test_completions_carry_the_workers_tokens_n_and_logprobs(client: openai.OpenAI):
    response = client.completions.create(model="mock", prompt=PROMPT, max_tokens=4, n=3, logprobs=2, seed=1)
    assert [choice.index for choice in response.choices] == [0, 1, 2]
    assert len({choice.text for choice in response.choices}) == 3  # the mock's choices differ
    logprobs = response.choices[0].logprobs
    assert logprobs is not None and logprobs.token_logprobs == [-0.5] * 4
    assert logprobs.top_logprobs is not None and all(len(top) == 2 for top in logprobs.top_logprobs)
    assert response.usage is not None and (response.usage.prompt_tokens, response.usage.completion_tokens) == (16, 12)


def test_echo_with_logprobs_reads_the_workers_prompt_logprobs(client: openai.OpenAI):
    response = client.completions.create(model="mock", prompt=PROMPT, max_tokens=1, echo=True, logprobs=1)
    logprobs = response.choices[0].logprobs
    assert logprobs is not None and logprobs.token_logprobs is not None
    assert logprobs.token_logprobs[: len(PROMPT)] == [None] + [-1.0] * (len(PROMPT) - 1)


def test_streams_reuse_the_connections_to_the_worker(client: openai.OpenAI, mock: MockWorker):
    """Every stream is read to the end of its body, so twenty streams in a row share a pooled connection."""
    before = mock.stats()
    for _ in range(20):
        chunks = list(client.completions.create(model="mock", prompt=PROMPT, max_tokens=8, stream=True))
        assert "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)
        assert chunks[-1].choices[0].finish_reason == "length"
    after = mock.stats()
    assert after["requests"] - before["requests"] >= 20
    # Health checks share the pool, so a stream may find the connection busy and open a second one.
    assert after["connections"] - before["connections"] <= 2


def test_what_the_worker_refuses_is_a_400_with_its_message(client: openai.OpenAI):
    with pytest.raises(openai.BadRequestError, match=r"The model worker rejected the request: Token id out of vocab"):
        client.completions.create(model="mock", prompt=[5, WORKER_VOCABULARY + 1], max_tokens=1)
