"""API keys without a server: hashing, lookup, the CLI's entry, OpenAI's reset format, the store's URI."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from server.auth import KEY_PREFIX, KeyRing, bearer_token, key_hash, key_in_query, new_key
from server.cli import main
from server.config import ApiKeyConfig, AuthConfig, Settings, StateConfig
from server.quotas import reset_text, storage_uri
from server.usage import LedgerUsage, RedisUsage, RequestUsage, usage_store


async def test_new_keys_are_random_and_found_by_their_hash_only():
    keys = [new_key() for _ in range(3)]
    assert len(set(keys)) == 3 and all(key.startswith(KEY_PREFIX) and len(key) > 40 for key in keys)
    ring = KeyRing([ApiKeyConfig(name=f"k{i}", hash=key_hash(key)) for i, key in enumerate(keys)])
    assert [(await ring.find(key)).name for key in keys] == ["k0", "k1", "k2"]  # type: ignore[union-attr]
    assert await ring.find(keys[0][:-1]) is None and await ring.find("") is None


@pytest.mark.parametrize(
    ("header", "token"),
    [(b"Bearer sk-1", "sk-1"), (b"bearer  sk-1 ", "sk-1"), (b"Basic sk-1", None), (b"Bearer", None), (b"", None)],
)
def test_only_a_bearer_token_counts(header: bytes, token: str | None):
    assert bearer_token({"headers": [(b"authorization", header)]}) == token


@pytest.mark.parametrize(
    ("query", "refused"),
    [(b"api_key=x", True), (b"key=", True), (b"q=sk-alignd-abc", True), (b"stream=1", False), (b"", False)],
)
def test_a_key_in_the_query_string_is_recognised(query: bytes, refused: bool):
    assert key_in_query({"query_string": query}) is refused


def test_keys_create_prints_the_key_once_and_an_entry_holding_its_hash(capsys: pytest.CaptureFixture[str]):
    assert main(["keys", "create", "--name", "team-a", "--models", "tiny-base", "--requests-per-minute", "10"]) == 0
    out = capsys.readouterr().out
    key = next(line.strip() for line in out.splitlines() if line.strip().startswith(KEY_PREFIX))
    (entry,) = yaml.safe_load(out.split("`auth.keys`:\n", 1)[1])
    assert entry.pop("created_at")
    assert entry == {"name": "team-a", "hash": key_hash(key), "models": ["tiny-base"], "requests_per_minute": 10}
    assert AuthConfig(enabled=True, keys=[ApiKeyConfig(**entry)]).keys[0].name == "team-a"


def test_auth_on_needs_keys_with_unique_names():
    model = {"name": "m", "path": "/m"}
    with pytest.raises(ValueError, match="needs keys"):
        Settings(models=[model], auth={"enabled": True})
    assert Settings(models=[model], auth={"enabled": True, "key_file": "~/keys.json"}).auth.key_file == (
        Path.home() / "keys.json"
    )
    entry = {"name": "a", "hash": "0" * 64}
    with pytest.raises(ValueError, match="unique"):
        AuthConfig(keys=[ApiKeyConfig(**entry), ApiKeyConfig(**entry)])
    with pytest.raises(ValueError):
        ApiKeyConfig(name="a", hash="plaintext-key")


@pytest.mark.parametrize(("seconds", "text"), [(0.02, "20ms"), (1.0, "1s"), (59.2, "1m0s"), (360, "6m0s"), (-1, "0ms")])
def test_reset_durations_are_written_as_openai_does(seconds: float, text: str):
    assert reset_text(seconds) == text


@pytest.mark.parametrize(
    ("url", "uri"),
    [(None, "async+memory://"), ("redis://h:6379/0", "async+redis://h:6379/0"),
     ("valkey://h:6379", "async+redis://h:6379"), ("valkeys://h:6380", "async+rediss://h:6380"),
     ("redis://valkey:6379/0", "async+redis://valkey:6379/0")],
)  # fmt: skip
def test_the_store_url_picks_the_limits_storage(url: str | None, uri: str):
    assert storage_uri(StateConfig(url=url)) == uri


async def test_the_ledger_keeps_every_request_across_a_restart(tmp_path: Path):
    ledger = tmp_path / "state" / "usage.jsonl"  # its directory is made
    store = LedgerUsage(ledger)
    await store.record(RequestUsage("a", "m", 200, prompt_tokens=3, completion_tokens=5, engine_calls=1, work=40))
    await store.record(RequestUsage("a", "m", 429))
    await store.record(RequestUsage("b", "m", 200, prompt_tokens=1))
    with ledger.open("a") as cut_short:  # a crash in the middle of a line
        cut_short.write('{"key": "a", "mod')
    reloaded = await LedgerUsage(ledger).totals("a")
    assert reloaded == await store.totals("a")
    await LedgerUsage(ledger).record(RequestUsage("c", "m", 200))  # after the cut line, on a line of its own
    counts = {"requests": 2, "status_200": 1, "status_429": 1, "prompt_tokens": 3, "completion_tokens": 5,
              "engine_calls": 1, "reward_calls": 0, "work": 40}  # fmt: skip
    assert reloaded == {"a": {"m": counts}}
    assert set(await LedgerUsage(ledger).totals(None)) == {"a", "b", "c"}


def test_the_usage_store_connects_where_the_url_says():
    store = usage_store(StateConfig(url="valkey://valkey:6380/2"), None)
    assert isinstance(store, RedisUsage)
    assert {k: store.client.connection_pool.connection_kwargs[k] for k in ("host", "port", "db")} == {
        "host": "valkey", "port": 6380, "db": 2,
    }  # fmt: skip
