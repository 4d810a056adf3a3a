"""Durable ASAp tries: the store written to disk and read back, so a restart keeps what ASAp learned.

A snapshot is gzipped JSON: a format tag, each model's identity when it was written (its tokenizer's
fingerprint: tries are in its token ids), and every trie with its key, model, grammar, token budget and
nodes in preorder. It is written to a temporary file next to the target, flushed and renamed over it, so a
crash leaves the previous snapshot whole. On load, tries of a model that is not served now, or served with
another identity, are left out; a snapshot that cannot be read (corrupt, truncated, another format) is
ignored with a warning. A server never fails to start because of one.

The gateway keeps its in-process store with ``TrieSnapshots`` (on its event loop); a vLLM worker, which has
no loop of ours, keeps the plugin's store with ``ThreadedSnapshots`` (a daemon thread). Both write with
``save_store`` and read with ``load_store``.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from decoding.grammar.params import GrammarParams
from decoding.grammar.trie import EFGNode, EFGStore, EFGTrie

logger = logging.getLogger(__name__)

FORMAT = "alignd-asap-tries/1"


def save_store(store: EFGStore, path: Path, identities: Mapping[str, str]) -> int:
    """Writes every trie of ``store`` to ``path`` atomically; returns how many."""
    with store.lock:
        tries = [
            {"key": key, "model": entry.model, "max_tokens": entry.max_tokens, "last_used": entry.last_used,
             "grammar": entry.params.model_dump() if entry.params else None, "nodes": _nodes(entry.trie)}
            for key, entry in store.entries()
        ]  # fmt: skip
    payload = {"format": FORMAT, "models": dict(identities), "tries": tries}
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as scratch:
        try:
            with gzip.GzipFile(fileobj=scratch, mode="wb") as compressed:
                compressed.write(json.dumps(payload).encode())
            scratch.flush()
            os.fsync(scratch.fileno())
        except BaseException:
            os.unlink(scratch.name)
            raise
    os.replace(scratch.name, path)
    return len(tries)


def load_store(store: EFGStore, path: Path, identities: Mapping[str, str]) -> int:
    """Adds the tries of the snapshot at ``path`` whose model is served with the same identity; returns how
    many. A missing snapshot loads nothing; an unreadable one is ignored with a warning."""
    if not path.exists():
        return 0
    try:
        payload = json.loads(gzip.decompress(path.read_bytes()))
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ValueError(f"not an {FORMAT} snapshot")
        written_by = payload["models"]
        kept = [t for t in payload["tries"]
                if t["model"] in identities and identities[t["model"]] == written_by.get(t["model"])]  # fmt: skip
        loaded = [(t, _trie(t["nodes"])) for t in kept]
    except (OSError, EOFError, ValueError, KeyError, TypeError, IndexError) as exc:
        logger.warning("ASAp trie snapshot ignored", extra={"path": str(path), "reason": str(exc)[:300]})
        return 0
    for record, trie in reversed(loaded):  # newest first: each goes in front of the ones after it
        params = GrammarParams.model_validate(record["grammar"]) if record["grammar"] else None
        store.restore(record["key"], trie, model=record["model"], params=params, max_tokens=record["max_tokens"],
                      last_used=record["last_used"])  # fmt: skip
    skipped = len(payload["tries"]) - len(kept)
    logger.info("ASAp tries loaded", extra={"path": str(path), "tries": len(loaded), "skipped": skipped})
    return len(loaded)


def _nodes(trie: EFGTrie) -> list[list[Any]]:
    """The trie in preorder: [parent index, token, log_p, log_unvisited, log_efg] per node."""
    rows: list[list[Any]] = []
    pending: list[tuple[EFGNode, int]] = [(trie.root, -1)]
    while pending:
        node, parent = pending.pop()
        rows.append([parent, node.token, node.log_p, node.log_unvisited, node.log_efg])
        index = len(rows) - 1
        pending.extend((child, index) for child in node.children.values())
    return rows


def _trie(rows: list[list[Any]]) -> EFGTrie:
    trie = EFGTrie()
    nodes: list[EFGNode] = []
    for parent, token, log_p, log_unvisited, log_efg in rows:
        if parent < 0:
            node = trie.root
        else:
            node = EFGNode(nodes[parent], int(token), log_p=float(log_p))
            nodes[parent].children[node.token] = node  # type: ignore[index]
        node.log_unvisited = None if log_unvisited is None else float(log_unvisited)
        node.log_efg = float(log_efg)
        nodes.append(node)
    if not nodes or nodes[0] is not trie.root:
        raise ValueError("a trie's first node must be its root")
    trie.size = len(nodes)
    return trie


class TrieSnapshots:
    """A store's snapshot at ``path``: read once the models are loaded, written every ``interval_s`` after
    that and once more at exit.

    Args:
        identities: each served model's identity, known once the models are loaded.
    """

    def __init__(
        self, store: EFGStore, path: Path, interval_s: float, identities: Callable[[], Mapping[str, str]]
    ) -> None:
        self.store, self.path, self.interval_s, self.identities = store, path, interval_s, identities
        self.loaded = False

    async def load(self) -> None:
        await asyncio.to_thread(load_store, self.store, self.path, self.identities())
        self.loaded = True

    async def save(self) -> None:
        """Writes the store, unless the snapshot was never read (an empty store must not overwrite it)."""
        if self.loaded:
            count = await asyncio.to_thread(save_store, self.store, self.path, self.identities())
            logger.info("ASAp tries saved", extra={"path": str(self.path), "tries": count})

    async def keep_writing(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.save()
            except OSError:
                logger.exception("ASAp tries could not be saved", extra={"path": str(self.path)})


class ThreadedSnapshots:
    """A store's snapshot kept by a daemon thread: read at ``start``, written every ``interval_s``, at once
    when ``flush`` wakes it, and once more at ``close``; for a process whose event loop is not ours (the
    engine core of a vLLM worker, where the grammar plugin's store lives).

    A thread, not a check on the processor's path: the gzip, JSON and fsync happen off the engine's step
    (``save_store`` holds ``store.lock`` only to copy the tries), and an idle worker still writes what it
    learned before going idle. A failed write is a warning: the worker goes on serving, and the previous
    snapshot stays whole (the write is atomic).

    Args:
        identities: each served model's identity (its tokenizer's fingerprint).
    """

    def __init__(self, store: EFGStore, path: Path, interval_s: float, identities: Mapping[str, str]) -> None:
        self.store, self.path, self.interval_s, self.identities = store, path, interval_s, dict(identities)
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._keep_writing, name="alignd-trie-snapshots", daemon=True)

    def start(self) -> int:
        """Loads the snapshot, then starts writing; returns how many tries were loaded."""
        loaded = load_store(self.store, self.path, self.identities)
        self._thread.start()
        return loaded

    def save(self) -> bool:
        """Writes the store now; False (and a warning) if that failed."""
        try:
            count = save_store(self.store, self.path, self.identities)
        except Exception:  # a full disk or a bad path must not end the worker's thread, let alone the worker
            logger.warning("ASAp tries could not be saved", extra={"path": str(self.path)}, exc_info=True)
            return False
        logger.info("ASAp tries saved", extra={"path": str(self.path), "tries": count})
        return True

    def flush(self) -> None:
        """Wakes the thread to write now. Safe in a signal handler: the main thread never holds the event's
        lock, so setting it cannot deadlock."""
        self._wake.set()

    def close(self, timeout: float = 10.0) -> None:
        """Writes once more and stops the thread (waiting up to ``timeout`` for the write)."""
        self._closing.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        elif self._thread.ident is not None:  # started, and ended: nothing writes for us
            self.save()

    def _keep_writing(self) -> None:
        while True:
            self._wake.wait(self.interval_s)
            self._wake.clear()
            # Read after clearing: a ``close`` from now on leaves the event set, so one more write follows.
            closing = self._closing.is_set()
            self.save()
            if closing:
                return
