"""ASAp's tries survive a vLLM worker's restart: a gateway of its own (one managed tiny-base worker with the
grammar plugin), started twice with one snapshot directory (``tries.worker_snapshots``).

Its own gateway, not the session's: stopping it is the point (its worker gets the SIGTERM a managed worker
gets when the gateway stops). Two worker starts in all: the first also shows that a corrupt snapshot is
ignored with a warning and the worker serves, and (its interval outlasting the test) that what it learned
is written when it stops.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml

from decoding.grammar import EFGStore
from decoding.grammar.snapshots import load_store
from evaluation.gateway import LocalGateway
from loadtest.stacks import CPU_WORKER
from models.tokenizer import Tokenizer
from tests.conftest import STARTUP_TIMEOUT_S
from tests.integration.test_grammar import YES_NO
from tests.unit.decoding.grammar.test_snapshots import contents

INTERVAL_S = 1.0
"""Short, so that the restarted worker soon writes what it loaded, before the test asks anything."""
NEVER_S = 3600.0
"""The first worker's interval: it writes only when it stops."""


def config(models: Path, logs: Path, embeddings: Path, snapshots: Path, interval_s: float) -> dict[str, Any]:
    return {
        "model_root": str(models),
        "models": [{"name": "tiny-base", "backend": "vllm", "path": "base", "max_model_len": 1024,
                    "vllm": CPU_WORKER}],
        "workers": {"log_dir": str(logs)},
        "tries": {"worker_snapshots": str(snapshots), "snapshot_interval_s": interval_s},
        "guidelines": {"cache_dir": str(embeddings)},
    }  # fmt: skip


def learn(gateway: LocalGateway, seed: int) -> None:
    with gateway.client() as client:
        completion = client.completions.create(
            model="tiny-base", prompt="Say yes or no:", max_tokens=8, n=4, seed=seed, temperature=1.0,
            extra_body={"alignment": {"grammar": {**YES_NO, "mode": "asap"}}},
        )  # fmt: skip
    assert len(completion.choices) == 4


def tries(path: Path, identity: str) -> dict[str, Any]:
    """Each trie of the snapshot: model, budget, when last used, and every node's values by prefix."""
    store = EFGStore()
    assert load_store(store, path, {"tiny-base": identity}) > 0
    with store.lock:
        return {key: (e.model, e.max_tokens, e.last_used, contents(e.trie)) for key, e in store.entries()}


def rewritten(path: Path, since: float, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while path.stat().st_mtime_ns == since:
        assert time.monotonic() < deadline, "the restarted worker never wrote its snapshot"
        time.sleep(0.2)


def changed(path: Path, identity: str, before: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
    """The snapshot once the worker has written what it learned since ``before``."""
    deadline = time.monotonic() + timeout
    while (now := tries(path, identity)) == before:
        assert time.monotonic() < deadline, "the worker never wrote what it learned"
        time.sleep(0.2)
    return now


def test_a_restarted_worker_reloads_its_tries_and_learns_on_from_them(
    tiny_models: Path, embeddings_cache: Path, tmp_path: Path
):
    snapshot, logs = tmp_path / "tries" / "tiny-base-0.tries.json.gz", tmp_path / "workers"
    snapshot.parent.mkdir()
    snapshot.write_bytes(b"not a snapshot")  # a corrupt one: ignored, and the worker serves
    paths = {interval: tmp_path / f"alignd-{interval:.0f}s.yaml" for interval in (NEVER_S, INTERVAL_S)}
    for interval, path in paths.items():
        path.write_text(yaml.safe_dump(config(tiny_models, logs, embeddings_cache, snapshot.parent, interval)))
    identity = Tokenizer(tiny_models / "base", name="tiny-base").fingerprint  # what the gateway reports

    with LocalGateway(paths[NEVER_S], tmp_path / "first.log", startup_timeout=STARTUP_TIMEOUT_S) as first:
        learn(first, seed=1)
        learn(first, seed=2)
        assert snapshot.read_bytes() == b"not a snapshot"  # nothing written yet
    assert "ASAp trie snapshot ignored" in (logs / "tiny-base-0.log").read_text(errors="replace")
    at_shutdown = tries(snapshot, identity)  # written when the worker stopped (vLLM did not SIGKILL it first)
    ((key, (*_, learned)),) = at_shutdown.items()
    written = snapshot.stat().st_mtime_ns

    with LocalGateway(paths[INTERVAL_S], tmp_path / "second.log", startup_timeout=STARTUP_TIMEOUT_S) as second:
        rewritten(snapshot, written)
        assert tries(snapshot, identity) == at_shutdown  # trie for trie, value for value: nothing lost
        learn(second, seed=3)
        after = changed(snapshot, identity, at_shutdown)[key][-1]

    # ASAp went on from the loaded trie (a fresh one would hold one request's paths): every node it had is
    # still there, and the bound on the grammar's probability only tightened.
    assert set(learned) <= set(after) and len(after) >= len(learned)
    assert after[()][2] <= learned[()][2] + 1e-9
