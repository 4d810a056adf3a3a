"""``alignd keys`` on a config whose key store is a file: keys created, listed, rotated and revoked, and
what a gateway's lookup sees after each."""

from __future__ import annotations

import asyncio
import json
import stat
from pathlib import Path

import pytest
import yaml

from server.auth import KEY_PREFIX, KeyRing, key_hash
from server.cli import main
from server.config import ApiKeyConfig
from server.keystore import FileKeys


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "alignd.yaml"
    configured = {"name": "ops", "hash": key_hash("sk-alignd-ops"), "admin": True}
    auth = {"enabled": True, "keys": [configured], "key_file": str(tmp_path / "keys.json")}
    path.write_text(yaml.safe_dump({"models": [{"name": "m", "path": "/m"}], "auth": auth}))
    return path


def printed_key(capsys: pytest.CaptureFixture[str]) -> str:
    out = capsys.readouterr().out
    return next(line.strip() for line in out.splitlines() if line.strip().startswith(KEY_PREFIX))


def listed(config: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, dict[str, object]]:
    assert main(["keys", "list", "--config", str(config)]) == 0
    return {row["name"]: row for row in map(json.loads, capsys.readouterr().out.splitlines())}


def test_a_stored_key_is_found_until_it_is_rotated_or_revoked(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    ring = KeyRing([], FileKeys(tmp_path / "keys.json"))

    def find(key: str) -> ApiKeyConfig | None:  # as a gateway would, while the CLI changes the file
        return asyncio.run(ring.find(key))

    args = ["--name", "team-a", "--models", "m", "--work-per-day", "500", "--config", str(config)]
    assert main(["keys", "create", *args]) == 0
    first = printed_key(capsys)
    found = find(first)
    assert found is not None and (found.name, found.models, found.work_per_day) == ("team-a", ["m"], 500)
    assert stat.S_IMODE((tmp_path / "keys.json").stat().st_mode) == 0o600
    assert first not in (tmp_path / "keys.json").read_text(), "only the hash is stored"

    rows = listed(config, capsys)
    assert {name: row["source"] for name, row in rows.items()} == {"ops": "config", "team-a": "store"}
    assert "hash" not in rows["team-a"] and rows["team-a"]["created_at"]

    assert main(["keys", "rotate", "team-a", "--config", str(config)]) == 0
    second = printed_key(capsys)
    assert find(first) is None
    rotated = find(second)
    assert rotated is not None and rotated.work_per_day == 500, "a rotation keeps the key's limits"

    assert main(["keys", "revoke", "team-a", "--config", str(config)]) == 0
    assert "`team-a` is revoked" in capsys.readouterr().out
    assert find(second) is None
    assert set(listed(config, capsys)) == {"ops"}


@pytest.mark.parametrize(
    ("command", "message"),
    [(["create", "--name", "ops"], "`ops` is a key of the config's `auth.keys` already"),
     (["revoke", "ops"], "`ops` is in the config's `auth.keys`: change it there"),
     (["rotate", "nobody"], "the key store holds no key named `nobody`"),
     (["revoke", "nobody"], "the key store holds no key named `nobody`")],
)  # fmt: skip
def test_what_the_store_cannot_do_is_said_and_changes_nothing(
    config: Path, command: list[str], message: str, capsys: pytest.CaptureFixture[str]
):
    assert main(["keys", *command, "--config", str(config)]) == 2
    assert message in capsys.readouterr().err
    assert set(listed(config, capsys)) == {"ops"}


def test_a_name_is_given_once(config: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["keys", "create", "--name", "team-b", "--config", str(config)]) == 0
    assert main(["keys", "create", "--name", "team-b", "--config", str(config)]) == 2
    assert "holds a key named `team-b` already" in capsys.readouterr().err


def test_a_config_without_a_store_says_how_to_get_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    path = tmp_path / "alignd.yaml"
    path.write_text(yaml.safe_dump({"models": [{"name": "m", "path": "/m"}]}))
    assert main(["keys", "revoke", "x", "--config", str(path)]) == 2
    assert "the config has no key store: set `state.url` or `auth.key_file`" in capsys.readouterr().err


async def test_a_damaged_key_file_refuses_its_keys_with_a_503(tmp_path: Path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps([ApiKeyConfig(name="a", hash=key_hash("sk-a")).model_dump(mode="json")])[:-3])
    with pytest.raises(Exception, match="unreadable") as raised:
        await FileKeys(path).find(key_hash("sk-a"))
    assert getattr(raised.value, "status_code", None) == 503
