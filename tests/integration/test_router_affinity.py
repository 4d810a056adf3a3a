"""Behind vLLM's own router (PyPI's ``vllm-router``, ``--policy consistent_hash``) in front of two mock workers:
the gateway sends its session header on every engine call, so every call of one Transfer-Q* or nudging request
reaches one worker, and different requests spread over both."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from evaluation.gateway import LocalGateway, free_port
from loadtest.mock_vllm import MockWorker

pytest.importorskip("vllm_router", reason="the router tests need PyPI's vllm-router (a dev dependency)")

REQUESTS = 12
TRANSFER_Q = {"transfer_q": {"baseline": "mock-baseline", "reward": "is-json", "top_k": 2, "rollout_tokens": 2}}
NUDGING = {"nudging": {"nudger": "mock-nudger", "gamma": 0.9, "nudge_max_tokens": 2, "base_chunk_tokens": 2}}


class Router:
    """``vllm-router`` on a free port in front of ``workers``, ready when it answers ``/health``."""

    def __init__(self, workers: list[str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [str(Path(sys.executable).with_name("vllm-router")), "--host", "127.0.0.1",
                   "--port", str(self.port), "--policy", "consistent_hash", "--prometheus-port", str(free_port()),
                   "--worker-urls", *workers]  # fmt: skip
        self._log = log.open("wb")
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.process.poll() is None, log.read_text()
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"vllm-router did not start:\n{log.read_text()}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self._log.close()


@pytest.fixture(scope="module")
def stack(
    tiny_models: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LocalGateway, list[MockWorker]]]:
    directory = tmp_path_factory.mktemp("router")
    with MockWorker("mock") as first, MockWorker("mock") as second:
        router = Router([first.url, second.url], directory / "router.log")
        try:
            # Three models of the gateway, one served model behind the router: the base, a Transfer-Q* baseline
            # (the base's tokenizer) and a nudger (a chat template).
            served = {"backend": "vllm", "vllm": {"urls": [router.url], "served_name": "mock", "grammar_plugin": False}}
            config = {
                "model_root": str(tiny_models),
                "models": [{"name": "mock", "path": "base", **served},
                           {"name": "mock-baseline", "path": "base", **served},
                           {"name": "mock-nudger", "path": "chat", **served}],
                "scorers": [{"name": "is-json", "backend": "rule", "rule": {"kind": "json"}}],
            }  # fmt: skip
            (directory / "alignd.yaml").write_text(yaml.safe_dump(config))
            with LocalGateway(directory / "alignd.yaml", directory / "alignd.log") as gateway:
                yield gateway, [first, second]
        finally:
            router.stop()


def sessions(workers: list[MockWorker]) -> list[dict[str, int]]:
    return [dict(worker.stats()["sessions"]) for worker in workers]


@pytest.mark.parametrize(("method", "alignment"), [("transfer_q", TRANSFER_Q), ("nudging", NUDGING)])
def test_every_engine_call_of_a_request_reaches_one_worker_and_requests_spread(
    stack: tuple[LocalGateway, list[MockWorker]], method: str, alignment: dict[str, Any]
):
    gateway, workers = stack
    before = sessions(workers)
    ids = [f"{method}-{index}" for index in range(REQUESTS)]
    for request_id in ids:
        body = {
            "model": "mock",
            "prompt": "Hello there",
            "max_tokens": 6,
            "alignment": {**alignment, "return_details": True},
        }
        response = httpx.post(
            f"{gateway.url}/v1/completions", json=body, headers={"x-request-id": request_id}, timeout=60
        )
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["alignment"]["engine_calls"] > 1
    after = sessions(workers)
    calls = [{key: count - seen.get(key, 0) for key, count in now.items() if count > seen.get(key, 0)}
             for now, seen in zip(after, before, strict=True)]  # fmt: skip
    assert set(calls[0]) | set(calls[1]) == set(ids), "every engine call carried its request's id"
    assert not set(calls[0]) & set(calls[1]), f"a request's calls reached both workers: {calls}"
    assert calls[0] and calls[1], f"{REQUESTS} requests all went to one worker: {calls}"
    assert all(count > 1 for worker in calls for count in worker.values())
