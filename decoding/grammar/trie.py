"""ASAp's tries: visited token prefixes with upper bounds on their expected future grammaticality (EFG).

Kept in log space, as sums that never subtract: a node stores the log of its
allowed probability mass that no visited child covers (computed exactly, from the
model's distribution, whenever a child is added) and

    EFG(u) = unvisited(u) + Σ_visited P(c | u) · EFG(c)

so a language whose probability is far below float64's resolution near 1 (a JSON
schema under a chat model: P(L) ~ 1e-40) keeps an exact, non-zero bound; the
``A - Σ P·(1 - EFG)`` form cancels to 0 there and loses the grammar. An unexpanded
node has EFG 1 (log 0); a dead end or a length cut-off has 0 (log -inf). EFG only
decreases, so stale reads under concurrency stay upper bounds.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from pydantic import BaseModel, Field

from decoding.grammar.params import GrammarParams


def log_sum_exp(values: Sequence[float]) -> float:
    top = max(values, default=-math.inf)
    if top == -math.inf:
        return -math.inf
    return top + math.log(sum(math.exp(value - top) for value in values))


@dataclass(slots=True, eq=False)
class EFGNode:
    parent: EFGNode | None
    token: int | None
    log_p: float = 0.0
    """log P(token | the parent's prefix): raw, temperature-1 probabilities."""
    log_unvisited: float | None = None
    """log of the allowed mass no visited child covers; None until the node is expanded."""
    log_efg: float = 0.0
    children: dict[int, EFGNode] = field(default_factory=dict)

    @property
    def efg(self) -> float:
        return math.exp(self.log_efg)

    @efg.setter
    def efg(self, value: float) -> None:
        self.log_efg = math.log(value) if value > 0 else -math.inf

    def recompute(self) -> bool:
        """Tightens the bound from the node's own terms; whether it changed."""
        if self.log_unvisited is None:
            return False
        terms = [self.log_unvisited, *(child.log_p + child.log_efg for child in self.children.values())]
        bound = min(self.log_efg, log_sum_exp(terms))
        changed = bound != self.log_efg
        self.log_efg = bound
        return changed


class EFGTrie:
    """Visited prefixes of one key with their EFG upper bounds."""

    def __init__(self) -> None:
        self.root = EFGNode(None, None)
        self.size = 1

    def child(self, node: EFGNode, token: int, log_p: float) -> EFGNode:
        """The child for ``token`` (made with ``log P(token | node)`` if new); the caller updates ``node``'s mass."""
        if token not in node.children:
            node.children[token] = EFGNode(node, token, log_p=log_p)
            self.size += 1
        return node.children[token]

    @staticmethod
    def settle(node: EFGNode, *, log_unvisited: float | None = None) -> None:
        """Sets a node's unvisited mass (when expanded or given a new child) and updates it and its ancestors,
        as far as a bound changes: a parent's bound depends only on its children's, so above an unchanged node
        nothing can change."""
        if log_unvisited is not None:
            node.log_unvisited = log_unvisited
        current: EFGNode | None = node
        while current is not None and current.recompute():
            current = current.parent


def trie_key(model: str, prompt_ids: Sequence[int], params: GrammarParams, *, temperature: float, top_p: float,
             max_tokens: int) -> str:  # fmt: skip
    """One trie per target distribution: model, prompt, grammar, sampling settings and length limit."""
    parts = [model, ",".join(map(str, prompt_ids)), params.digest, repr(temperature), repr(top_p), str(max_tokens)]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:24]


class TrieSummary(BaseModel):
    """One trie as the admin route lists it."""

    key: str
    model: str
    syntax: str | None
    grammar_hash: str | None
    max_tokens: int
    nodes: int
    root_efg: float = Field(description="The learned upper bound on P(L).")
    log_root_efg: float | None = Field(
        description="Its natural log, finite where root_efg underflows (null when it is 0)."
    )
    last_used: float = Field(description="Unix time of the last request that used it.")


@dataclass(slots=True)
class StoredTrie:
    trie: EFGTrie
    model: str
    params: GrammarParams | None
    max_tokens: int
    last_used: float


class EFGStore:
    """Tries by key, least recently used first out once the node budget is exceeded; thread-safe."""

    def __init__(self, max_nodes: int = 1_000_000) -> None:
        self.max_nodes = max_nodes
        self._entries: OrderedDict[str, StoredTrie] = OrderedDict()
        self.lock = threading.RLock()

    def trie(self, key: str, *, model: str = "", params: GrammarParams | None = None, max_tokens: int = 0) -> EFGTrie:
        with self.lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = StoredTrie(EFGTrie(), model, params, max_tokens, time.time())
            entry.last_used = time.time()
            self._entries.move_to_end(key)
            self._evict(keep=key)
            return entry.trie

    def restore(
        self, key: str, trie: EFGTrie, *, model: str, params: GrammarParams | None, max_tokens: int, last_used: float
    ) -> None:
        """Puts back a trie read from a snapshot (``decoding.grammar.snapshots``), unless the key has one."""
        with self.lock:
            if key not in self._entries:
                self._entries[key] = StoredTrie(trie, model, params, max_tokens, last_used)
                self._entries.move_to_end(key, last=False)  # older than anything used since the start
                self._evict(keep=next(reversed(self._entries)))

    def entries(self) -> list[tuple[str, StoredTrie]]:
        """Every (key, entry), least recently used first; call with ``lock`` held to read the tries."""
        with self.lock:
            return list(self._entries.items())

    def _evict(self, keep: str) -> None:
        while self.nodes > self.max_nodes and len(self._entries) > 1:
            oldest = next(iter(self._entries))
            if oldest == keep:
                self._entries.move_to_end(oldest)
                continue
            del self._entries[oldest]

    def summaries(self) -> list[TrieSummary]:
        """Every trie, most recently used first."""
        with self.lock:
            return [
                TrieSummary(
                    key=key, model=e.model, syntax=e.params.syntax if e.params else None,
                    grammar_hash=e.params.digest if e.params else None, max_tokens=e.max_tokens, nodes=e.trie.size,
                    root_efg=e.trie.root.efg, last_used=e.last_used,
                    log_root_efg=e.trie.root.log_efg if math.isfinite(e.trie.root.log_efg) else None,
                )
                for key, e in reversed(self._entries.items())
            ]  # fmt: skip

    def drop(self, key: str) -> bool:
        """Forgets one key's trie; False when there is none."""
        with self.lock:
            return self._entries.pop(key, None) is not None

    def clear(self) -> int:
        """Forgets every trie; returns how many there were."""
        with self.lock:
            count = len(self._entries)
            self._entries.clear()
            return count

    @property
    def nodes(self) -> int:
        return sum(entry.trie.size for entry in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries
