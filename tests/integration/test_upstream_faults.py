"""A broken worker behind the gateway: the mock vLLM worker of ``loadtest/`` answers every completion with one
fault (a response cut short, garbage, the wrong shape, a stall, a dropped connection). Every one is a 502
with a clear message (a stream: an error event), the gateway keeps serving once the worker heals, and it is
left with no more tasks or worker connections than before."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import psutil
import pytest
import yaml

from evaluation.gateway import LocalGateway
from loadtest.mock_vllm import FAULTS, MockWorker

PROMPT = list(range(5, 21))
# The gateway gives up on a silent worker after this long (`workers.request_timeout_s`).
READ_TIMEOUT_S = 1.0
# What the gateway says for each fault, unstreamed and streamed.
MESSAGES = {
    "truncate": ("failed", "before the end marker"),
    "garbage": ("not JSON", "not JSON"),
    "shape": ("not a vLLM completion", "not a vLLM completion"),
    "stall": ("timed out", "timed out"),
    "drop": ("failed", "failed"),
}


@pytest.fixture(scope="module")
def gateway(mock: MockWorker, tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalGateway]:
    directory = tmp_path_factory.mktemp("faults-gateway")
    config = {
        "model_root": str(tiny_models),
        "models": [mock.served_model()],
        "workers": {"request_timeout_s": READ_TIMEOUT_S, "health_interval_s": 0.2},
    }
    (directory / "alignd.yaml").write_text(yaml.safe_dump(config))
    with LocalGateway(directory / "alignd.yaml", directory / "alignd.log") as live:
        yield live


@pytest.fixture
def client(gateway: LocalGateway) -> Iterator[openai.OpenAI]:
    with gateway.client() as live:
        yield live.with_options(max_retries=0, timeout=30)


def loop_tasks(gateway: LocalGateway) -> int:
    match = re.search(r"^alignd_event_loop_tasks (\S+)$", httpx.get(f"{gateway.url}/metrics").text, re.M)
    assert match, "the gateway reports its event loop's tasks"
    return int(float(match.group(1)))


def worker_connections(gateway: LocalGateway, mock: MockWorker) -> int:
    return sum(
        1 for c in psutil.Process(gateway.process.pid).net_connections("tcp") if c.raddr and c.raddr.port == mock.port
    )


def wait_for(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout} s: {what}")


def serves(client: openai.OpenAI) -> bool:
    try:
        return client.completions.create(model="mock", prompt=PROMPT, max_tokens=3).choices[0].text != ""
    except openai.APIStatusError:
        return False


def test_every_fault_is_a_502_naming_it_and_leaks_nothing(
    gateway: LocalGateway, mock: MockWorker, client: openai.OpenAI
):
    assert serves(client)
    tasks_before, connections_before = loop_tasks(gateway), worker_connections(gateway, mock)
    seen: dict[str, tuple[int, str]] = {}
    for fault in FAULTS:
        mock.inject(fault)
        try:
            started = time.monotonic()
            with pytest.raises(openai.APIStatusError) as failed:
                client.completions.create(model="mock", prompt=PROMPT, max_tokens=3)
            seen[fault] = (failed.value.status_code, failed.value.message)
            assert time.monotonic() - started < READ_TIMEOUT_S + 10
            with pytest.raises(openai.APIError) as streamed:
                for _ in client.completions.create(model="mock", prompt=PROMPT, max_tokens=3, stream=True):
                    pass
            assert MESSAGES[fault][1] in streamed.value.message, (fault, streamed.value.message)
        finally:
            mock.inject(None)
        wait_for(lambda: serves(client), 10, f"the gateway serves again after `{fault}`")
    print({fault: status for fault, (status, _) in seen.items()})
    for fault, (status, message) in seen.items():
        assert status == 502 and MESSAGES[fault][0] in message, (fault, status, message)
    # Idle worker connections are dropped after a few seconds (models/worker_http.KEEPALIVE_S); a failed call
    # leaves none open (the health checks keep one), and no task outlives its request.
    wait_for(
        lambda: worker_connections(gateway, mock) <= connections_before, 15,
        f"the gateway is back to {connections_before} connections to the worker",
    )  # fmt: skip
    wait_for(lambda: loop_tasks(gateway) <= tasks_before, 10, f"the event loop is back to {tasks_before} tasks")
