"""SIGTERM drains the gateway (server/drain.py): new requests get a 503 ``shutting_down`` and ``/ready`` fails
while a stream in flight finishes; then the gateway and its managed workers stop. A stream longer than the
drain timeout is cut when it ends. The workers are the mock vLLM worker, launched and supervised by the
gateway, streaming at a known pace."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

from evaluation.gateway import LocalGateway
from loadtest.mock_vllm import managed_mock

TOKENS_PER_S = 10


def drained_gateway(directory: Path, tiny_models: Path, drain_timeout_s: float) -> LocalGateway:
    config = {"model_root": str(tiny_models), "drain_timeout_s": drain_timeout_s,
              "models": [managed_mock("mock", tokens_per_s=TOKENS_PER_S)]}  # fmt: skip
    (directory / "alignd.yaml").write_text(yaml.safe_dump(config))
    return LocalGateway(directory / "alignd.yaml", directory / "alignd.log")


class Stream(threading.Thread):
    """A streamed completion of ``max_tokens`` read to its end in the background; ``events`` are its data lines."""

    def __init__(self, gateway: LocalGateway, max_tokens: int) -> None:
        super().__init__()
        self.url, self.max_tokens = gateway.url, max_tokens
        self.events: list[str] = []
        self.started = threading.Event()

    def run(self) -> None:
        body = {"model": "mock", "prompt": [5, 6, 7], "max_tokens": self.max_tokens, "stream": True}
        try:
            with httpx.stream("POST", f"{self.url}/v1/completions", json=body, timeout=60) as response:
                for line in response.iter_lines():
                    if line:
                        self.events.append(line)
                        self.started.set()
        except httpx.HTTPError:
            pass  # cut off: what arrived is in `events`
        self.started.set()


def worker_pids(gateway: LocalGateway) -> list[int]:
    replicas: list[dict[str, Any]] = httpx.get(f"{gateway.url}/ready", timeout=5).json()["models"]["mock"]["replicas"]
    return [replica["pid"] for replica in replicas]


def test_sigterm_refuses_new_work_finishes_the_stream_then_stops_the_workers(tiny_models: Path, tmp_path: Path) -> None:
    with drained_gateway(tmp_path, tiny_models, drain_timeout_s=20) as gateway:
        workers = worker_pids(gateway)
        stream = Stream(gateway, max_tokens=3 * TOKENS_PER_S)  # 3 s
        stream.start()
        assert stream.started.wait(10)
        gateway.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)

        refused = httpx.post(f"{gateway.url}/v1/completions", json={"model": "mock", "prompt": [5], "max_tokens": 2})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
        assert refused.headers["retry-after"] == "1"
        assert httpx.get(f"{gateway.url}/ready").status_code == 503
        assert httpx.get(f"{gateway.url}/health").status_code == 200

        stream.join(30)
        assert stream.events[-1] == "data: [DONE]" and len(stream.events) > 3 * TOKENS_PER_S  # every token
        gateway.process.wait(15)
    assert not any(psutil.pid_exists(pid) for pid in workers), "the managed workers stopped with the gateway"


def test_a_stream_longer_than_the_drain_is_cut_when_it_ends(tiny_models: Path, tmp_path: Path) -> None:
    with drained_gateway(tmp_path, tiny_models, drain_timeout_s=1) as gateway:
        stream = Stream(gateway, max_tokens=30 * TOKENS_PER_S)  # 30 s
        stream.start()
        assert stream.started.wait(10)
        signalled = time.monotonic()
        gateway.process.send_signal(signal.SIGTERM)
        gateway.process.wait(15)
        stopped = time.monotonic() - signalled
        stream.join(10)
    print(f"stopped {stopped:.1f} s after SIGTERM with a 1 s drain; the stream had {len(stream.events)} events")
    assert stopped < 8
    assert "data: [DONE]" not in stream.events and len(stream.events) < 10 * TOKENS_PER_S


def test_a_second_sigterm_stops_at_once(tiny_models: Path, tmp_path: Path) -> None:
    with drained_gateway(tmp_path, tiny_models, drain_timeout_s=60) as gateway:
        stream = Stream(gateway, max_tokens=30 * TOKENS_PER_S)
        stream.start()
        assert stream.started.wait(10)
        signalled = time.monotonic()
        for _ in range(2):
            gateway.process.send_signal(signal.SIGTERM)
            time.sleep(0.3)
        gateway.process.wait(15)
        assert time.monotonic() - signalled < 8
        stream.join(10)
