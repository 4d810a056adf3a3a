"""Several gateway processes on one port (``processes``): both serve, and ``/metrics`` sums them."""

from __future__ import annotations

import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from evaluation.gateway import LocalGateway
from loadtest.mock_vllm import MockWorker

REQUESTS = 300


@pytest.fixture(scope="module")
def gateway(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalGateway]:
    directory = tmp_path_factory.mktemp("processes")
    with MockWorker("mock") as mock:
        config = directory / "alignd.yaml"
        settings = {"model_root": str(tiny_models), "processes": 2, "models": [mock.served_model()]}
        config.write_text(yaml.safe_dump(settings))
        with LocalGateway(config, directory / "alignd.log") as live:
            yield live


def served_completions(gateway: LocalGateway) -> float:
    text = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    pattern = r'^alignd_requests_total\{model="mock",route="/v1/completions",status="200"\} (\S+)$'
    return sum(float(value) for value in re.findall(pattern, text, re.MULTILINE))


def test_two_processes_share_the_load_and_their_metrics(gateway: LocalGateway):
    children = psutil.Process(gateway.process.pid).children()
    servers = [child for child in children if "spawn_main" in " ".join(child.cmdline())]
    assert len(servers) == 2
    before = [child.cpu_times().user for child in servers]
    body = {"model": "mock", "prompt": [5, 6, 7], "max_tokens": 4}

    def send(_: int) -> int:
        # A new connection per request, so the kernel picks the accepting process each time.
        return httpx.post(f"{gateway.url}/v1/completions", json=body, timeout=30).status_code

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(send, range(REQUESTS)))
    assert statuses == [200] * REQUESTS
    worked = [child.cpu_times().user - start for child, start in zip(servers, before, strict=True)]
    assert all(seconds > 0.05 for seconds in worked), worked
    # Whichever process answers /metrics reports every process's requests.
    assert {served_completions(gateway) for _ in range(6)} == {float(REQUESTS)}
