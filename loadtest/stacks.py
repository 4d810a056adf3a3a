"""Local gateway stacks the load tests and benchmarks run against, as alignd configs.

- ``embedded``: the tiny models in-process (``deploy/tiny-models.yaml``).
- ``vllm-cpu``: the same tiny models behind managed vLLM CPU workers (the base and chat models), the reward
  model in-process, and admission bounds sized for a 2-core machine.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from evaluation.gateway import LocalGateway
from models.tiny import ensure_tiny_models

STACKS = ("embedded", "vllm-cpu")
TINY_MODELS = Path("~/.cache/alignd/tiny-models").expanduser()
# vLLM CPU workers for tiny models: no graph capture, a small KV cache, nothing from the network.
# Every worker on CPU 0, the gateway and the clients keep the rest: with vLLM's engine busy-polling on
# every core, the wake-ups of every other process (the gateway noticing a hang-up) come seconds late.
CPU_WORKER: dict[str, Any] = {
    "args": ["--enforce-eager"],
    "env": {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"},
    "cpus": [0],
}


def vllm_model(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "backend": "vllm", "path": path, "max_model_len": 1024, "vllm": CPU_WORKER}


def vllm_cpu_config(models: Path, logs: Path, admission: dict[str, Any] | None = None) -> dict[str, Any]:
    """tiny-base and tiny-chat on managed vLLM CPU workers, ``rm`` in-process: every load-test profile runs."""
    return {
        "model_root": str(models),
        "models": [vllm_model("tiny-base", "base"), vllm_model("tiny-chat", "chat")],
        "scorers": [{"name": "rm", "backend": "hf", "path": "reward"}],
        "workers": {"log_dir": str(logs)},
        # Near the knee of two tiny workers sharing two cores with the gateway (see `make bench`).
        "admission": admission or {"max_in_flight_per_model": 16, "max_queued_per_model": 16, "queue_timeout_s": 10},
    }


def embedded_config() -> dict[str, Any]:
    return yaml.safe_load((Path(__file__).parents[1] / "deploy" / "tiny-models.yaml").read_text())


@contextlib.contextmanager
def local_stack(
    stack: str, *, models: Path = TINY_MODELS, admission: dict[str, Any] | None = None
) -> Iterator[LocalGateway]:
    """Starts the gateway (and its managed workers) of ``stack``; stops everything on exit."""
    ensure_tiny_models(models)
    with tempfile.TemporaryDirectory(prefix="alignd-stack-") as scratch:
        directory = Path(scratch)
        if stack == "vllm-cpu":
            config = vllm_cpu_config(models, directory / "workers", admission)
        elif stack == "embedded":
            config = {**embedded_config(), "model_root": str(models), **({"admission": admission} if admission else {})}
        else:
            raise ValueError(f"unknown stack {stack!r} (known: {', '.join(STACKS)})")
        path = directory / "alignd.yaml"
        path.write_text(yaml.safe_dump(config))
        with LocalGateway(path, directory / "alignd.log", startup_timeout=600) as gateway:
            yield gateway
