from collections.abc import AsyncIterator, Iterator
from importlib import resources
from pathlib import Path

import openai
import pytest
import yaml

from evaluation.gateway import LocalGateway
from loadtest.mock_vllm import MockWorker
from tests.conftest import VLLM_STACK

CONFIG = """\
model_root: {root}
models:
  - {{name: tiny-base, path: base}}
  - {{name: tiny-chat, path: chat, workers: 2}}
  - {{name: tiny-chat-shared, path: chat-shared}}
  - {{name: tiny-base-short, path: base, max_model_len: 64}}
  - {{name: tiny-chat-short, path: chat, max_model_len: 64}}
scorers:
  - {{name: rm, backend: hf, path: reward}}
  - {{name: is-json, backend: rule, rule: {{kind: json}}}}
guidelines:
  cache_dir: {embeddings}
profiles:
  - name: tiny-chat-safe
    model: tiny-chat
    alignment:
      guidelines: {{top_k: 2, threshold: 0.0}}
      best_of_n: {{n: 4, reward: rm}}
  - name: tiny-chat-unsure   # a random model is never sure: it always falls back
    model: tiny-chat
    alignment:
      abstain: {{threshold: 0.0, fallback: tiny-chat-safe}}
limits:
  max_n: 8
  max_logprobs: 5
  default_max_tokens: 32
  max_best_of_n: 8
  max_grammar_bytes: 4096
  max_body_bytes: 65536
"""


@pytest.fixture(scope="session")
def server(
    tiny_models: Path, embeddings_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalGateway]:
    directory = tmp_path_factory.mktemp("gateway")
    config = directory / "alignd.yaml"
    config.write_text(CONFIG.format(root=tiny_models, embeddings=embeddings_cache))
    with LocalGateway(config, directory / "alignd.log") as live:
        yield live


@pytest.fixture(params=["in-process", VLLM_STACK])
def stack(request: pytest.FixtureRequest) -> LocalGateway:
    """A test that must hold on both engines: the in-process gateway, then the one with vLLM CPU workers."""
    return request.getfixturevalue("server" if request.param == "in-process" else "vllm_gateway")


@pytest.fixture
def stack_client(stack: LocalGateway) -> Iterator[openai.OpenAI]:
    with stack.client() as live:
        yield live


@pytest.fixture
def client(server: LocalGateway) -> Iterator[openai.OpenAI]:
    with server.client() as live:
        yield live


@pytest.fixture
async def async_client(server: LocalGateway) -> AsyncIterator[openai.AsyncOpenAI]:
    async with server.async_client() as live:
        yield live


@pytest.fixture(scope="session")
def toy_gateway(  # the embedded default on the toy world, with room for best-of-16 and a length rule
    toy_world: Path, embeddings_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalGateway]:
    config = yaml.safe_load(resources.files("server").joinpath("embedded.yaml").read_text())
    config |= {"model_root": str(toy_world), "toy_world": False, "limits": {"max_n": 16, "max_best_of_n": 16}}
    config["guidelines"]["cache_dir"] = str(embeddings_cache)
    config["scorers"].append({"name": "concise", "backend": "rule", "rule": {"kind": "length", "target": 40}})
    directory = tmp_path_factory.mktemp("toy-gateway")
    (directory / "alignd.yaml").write_text(yaml.safe_dump(config))
    with LocalGateway(directory / "alignd.yaml", directory / "alignd.log") as live:
        yield live


@pytest.fixture(scope="module")
def mock() -> Iterator[MockWorker]:
    """A mock vLLM worker serving `mock`, one per test module."""
    with MockWorker("mock") as worker:
        yield worker
