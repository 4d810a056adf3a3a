"""Admission control through the HTTP API: 429 with Retry-After when a model is full, slots freed however a
request ends, the compute budget checked before work starts, all of it in /metrics."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from evaluation.gateway import LocalGateway

pytestmark = pytest.mark.slow

# One slot and one queue place per model, a short queue wait, and a compute budget a best-of-4 exceeds.
CONFIG = """\
model_root: {root}
models:
  - {{name: tiny-base, path: base}}
scorers:
  - {{name: is-json, backend: rule, rule: {{kind: json}}}}
guidelines:
  cache_dir: {embeddings}
admission: {{max_in_flight_per_model: 1, max_queued_per_model: 1, queue_timeout_s: 0.5}}
limits: {{max_request_work: 4096}}
"""
# Greedy on the tiny model runs to the length limit: about 2.5 s on one CPU core, long enough to hold the
# only slot while the test sends other requests.
HOLD = {"model": "tiny-base", "prompt": "hold", "max_tokens": 1900, "temperature": 0, "stream": True}


@pytest.fixture(scope="module")
def server(
    tiny_models: Path, embeddings_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalGateway]:
    directory = tmp_path_factory.mktemp("admission")
    config = directory / "alignd.yaml"
    config.write_text(CONFIG.format(root=tiny_models, embeddings=embeddings_cache))
    with LocalGateway(config, directory / "alignd.log") as live:
        yield live


def metric(server: LocalGateway, line_start: str) -> float:
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    return 0.0


def wait_for_metric(server: LocalGateway, line_start: str, value: float, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while metric(server, line_start) != value:
        assert time.monotonic() < deadline, f"{line_start} did not reach {value}"
        time.sleep(0.02)


IN_FLIGHT = 'alignd_admission_in_flight{model="tiny-base"}'
QUEUED = 'alignd_admission_queued{model="tiny-base"}'


async def test_a_full_model_answers_429_with_retry_after_and_serves_again(server: LocalGateway):
    async with server.async_client() as client:
        holder = await client.completions.create(**HOLD)
        chunks = aiter(holder)
        await anext(chunks)  # the slot is taken until this stream's last byte
        queued = asyncio.create_task(client.completions.create(model="tiny-base", prompt="wait", max_tokens=4))
        await asyncio.to_thread(wait_for_metric, server, QUEUED, 1)

        with pytest.raises(openai.RateLimitError) as full:
            await client.completions.create(model="tiny-base", prompt="more", max_tokens=4)
        error = full.value.body
        assert isinstance(error, dict) and error["code"] == "model_overloaded"
        assert "1 requests are already waiting" in error["message"]
        assert int(full.value.response.headers["retry-after"]) >= 1

        with pytest.raises(openai.RateLimitError) as waited:
            await queued
        assert "no slot freed within 0.5 s" in str(waited.value)

        async for _ in chunks:
            pass
        served = await client.completions.create(model="tiny-base", prompt="again", max_tokens=4)
        assert served.choices[0].finish_reason in ("stop", "length")
    assert metric(server, 'alignd_admission_rejected_total{model="tiny-base",reason="queue_full"}') >= 1
    assert metric(server, 'alignd_admission_rejected_total{model="tiny-base",reason="queue_timeout"}') >= 1
    assert metric(server, 'alignd_requests_total{model="tiny-base",route="/v1/completions",status="429"}') >= 2
    wait_for_metric(server, IN_FLIGHT, 0)


def test_a_client_that_hangs_up_frees_its_slot(server: LocalGateway):
    with httpx.stream("POST", f"{server.url}/v1/completions", json=HOLD, timeout=30) as response:
        assert response.status_code == 200
        lines = response.iter_lines()  # kept: closing the iterator would hang up already
        next(lines)
        assert metric(server, IN_FLIGHT) == 1
    wait_for_metric(server, IN_FLIGHT, 0)
    with server.client() as client:
        assert client.completions.create(model="tiny-base", prompt="next", max_tokens=4).choices


def test_the_compute_budget_is_checked_before_any_work(server: LocalGateway):
    generated_before = metric(server, 'alignd_tokens_total{kind="completion",model="tiny-base"}')
    with server.client() as client, pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(
            model="tiny-base",
            prompt="x",
            max_tokens=600,
            extra_body={"alignment": {"best_of_n": {"n": 4, "reward": "is-json"}}},
        )
    error = refused.value.body
    assert isinstance(error, dict)
    assert error["param"] == "max_tokens" and error["code"] == "work_budget_exceeded"
    assert "4 samples x 600 tokens x 2 models = 4800" in error["message"]
    assert metric(server, 'alignd_admission_rejected_total{model="tiny-base",reason="work_budget"}') == 1
    assert metric(server, 'alignd_tokens_total{kind="completion",model="tiny-base"}') == generated_before
    wait_for_metric(server, IN_FLIGHT, 0)


def test_the_bounds_are_visible_in_metrics(server: LocalGateway):
    assert metric(server, 'alignd_admission_limit{limit="in_flight_per_model"}') == 1
    assert metric(server, 'alignd_admission_limit{limit="queued_per_model"}') == 1
    assert metric(server, 'alignd_admission_limit{limit="queue_timeout_seconds"}') == 0.5
    assert metric(server, 'alignd_admission_limit{limit="request_work"}') == 4096
    assert metric(server, "process_resident_memory_bytes") > 0  # what a soak test watches


async def test_alignd_eval_waits_out_429s_and_loses_no_request(server: LocalGateway, tmp_path: Path):
    from evaluation.matrix import parse_matrix
    from evaluation.run import Evaluation, client_for

    plain = {"model": "tiny-base", "route": "completions"}
    matrix = parse_matrix({"reward": {"scorers": ["is-json"], "model": "tiny-base"},
                           "base": {**plain, "sampling": {"max_tokens": 64}},
                           "aligned": {**plain, "sampling": {"max_tokens": 32}}})  # fmt: skip
    tasks = [
        {"id": f"t{i}", "prompt": f"def f{i}(x):", "checker": "contains", "reference": "return"} for i in range(12)
    ]
    rejected_before = metric(server, 'alignd_admission_rejected_total{model="tiny-base",reason="queue_full"}')
    async with client_for(server.url, api_key=None, timeout=60) as client:
        outcomes = await Evaluation(client, matrix, tasks, tmp_path, concurrency=6, progress=False).run()
    assert [len(outcomes["base"]), len(outcomes["aligned"])] == [12, 12]
    assert all(o.error is None and "is-json" in o.rewards for runs in outcomes.values() for o in runs)
    assert metric(server, 'alignd_admission_rejected_total{model="tiny-base",reason="queue_full"}') > rejected_before
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 24
