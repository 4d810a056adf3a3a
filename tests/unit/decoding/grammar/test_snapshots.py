"""ASAp tries on disk: a snapshot reads back exactly; foreign, corrupt or half-written ones never load."""

from __future__ import annotations

import gzip
import json
import logging
import random
from pathlib import Path

import pytest

from decoding.grammar import EFGStore, EFGTrie
from decoding.grammar.snapshots import FORMAT, TrieSnapshots, load_store, save_store
from tests.unit.decoding.grammar.test_trie import nodes
from tests.unit.decoding.grammar.toy import GRAMMAR, sample

IDENTITIES = {"m": "vocab-1", "other": "vocab-2"}


def learned() -> EFGStore:
    store = EFGStore()
    for key, model in (("k1", "m"), ("k2", "m"), ("k3", "other")):
        trie = store.trie(key, model=model, params=GRAMMAR, max_tokens=6)
        rng = random.Random(key)
        for _ in range(60):
            sample(trie, rng)
    dead = store.trie("k0", model="m", params=GRAMMAR, max_tokens=1)  # a dead end: its bounds are log 0
    EFGTrie.settle(dead.child(dead.root, 5, -0.5), log_unvisited=float("-inf"))
    EFGTrie.settle(dead.root, log_unvisited=float("-inf"))
    return store


def contents(trie: EFGTrie) -> dict[tuple[int, ...], tuple[float, float | None, float]]:
    return {prefix: (node.log_p, node.log_unvisited, node.log_efg) for node, prefix in nodes(trie)}


def test_a_snapshot_reads_back_every_trie_exactly(tmp_path: Path):
    store, path = learned(), tmp_path / "tries.json.gz"
    assert save_store(store, path, IDENTITIES) == 4
    restored = EFGStore()
    assert load_store(restored, path, IDENTITIES) == 4
    assert [s.model_dump() for s in restored.summaries()] == [s.model_dump() for s in store.summaries()]
    for key in ("k0", "k1", "k2", "k3"):
        assert contents(restored.trie(key)) == contents(store.trie(key))
    assert restored.trie("k0").root.log_efg == float("-inf")


def test_only_tries_of_models_served_with_the_same_tokenizer_load(tmp_path: Path):
    path = tmp_path / "tries.json.gz"
    save_store(learned(), path, IDENTITIES)
    restored = EFGStore()
    assert load_store(restored, path, {"m": "vocab-1", "other": "a-new-vocabulary"}) == 3
    assert "k3" not in restored and "k1" in restored
    assert load_store(EFGStore(), path, {}) == 0


@pytest.mark.parametrize(
    "written",
    [b"not gzip at all", gzip.compress(b"{\"format\": \"something-else\"}"), gzip.compress(b"[1, 2"),
     gzip.compress(json.dumps({"format": FORMAT, "models": {"m": "vocab-1"}, "tries": [{"model": "m"}]}).encode()),
     gzip.compress(json.dumps({"format": FORMAT, "models": {"m": "vocab-1"}, "tries": [
         {"key": "k", "model": "m", "max_tokens": 1, "last_used": 0, "grammar": None, "nodes": [[3, 1, 0, 0, 0]]}
     ]}).encode())],
    ids=["garbage", "foreign", "truncated-json", "missing-fields", "broken-trie"],
)  # fmt: skip
def test_a_snapshot_that_cannot_be_read_is_ignored_with_a_warning(
    tmp_path: Path, written: bytes, caplog: pytest.LogCaptureFixture
):
    path = tmp_path / "tries.json.gz"
    path.write_bytes(written)
    store = EFGStore()
    with caplog.at_level(logging.WARNING):
        assert load_store(store, path, IDENTITIES) == 0
    assert len(store) == 0 and "snapshot ignored" in caplog.text


def test_a_failed_write_leaves_the_previous_snapshot_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "tries.json.gz"
    save_store(learned(), path, IDENTITIES)
    before = path.read_bytes()

    def full_disk(*_: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gzip.GzipFile, "write", full_disk)
    with pytest.raises(OSError):
        save_store(learned(), path, IDENTITIES)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["tries.json.gz"]


async def test_an_unread_snapshot_is_never_overwritten(tmp_path: Path):
    path = tmp_path / "tries.json.gz"
    save_store(learned(), path, IDENTITIES)
    before = path.read_bytes()
    snapshots = TrieSnapshots(EFGStore(), path, 60.0, lambda: IDENTITIES)
    await snapshots.save()  # the models never loaded: the empty store must not replace what was learned
    assert path.read_bytes() == before
    await snapshots.load()
    await snapshots.save()
    assert load_store(EFGStore(), path, IDENTITIES) == 4
