"""The per-token grammar processors, shared by the in-process engine and the vLLM plugin.

One sequence's grammar is a ``LogitsProcessorList`` over one ``GrammarState`` (the
xgrammar matcher, advanced once per position, and the allowed-token mask there):

- GCD: ``[GCDLogitsProcessor]`` masks the tokens that cannot continue a grammatical
  output (at the last position of the budget, everything but an ending);
- ASAp: ``[ASApLogitsProcessor, GCDLogitsProcessor]``: ASAp adds ``log EFG(u t)`` to
  each visited child's logit, the mask follows. ASAp must see the raw logits
  (temperature 1): it reads ``P(t | u)`` from them to expand nodes.

Each returns a new tensor and leaves its input as it is. Engines call them only for
sequences that have not ended; a processor called after the end changes nothing.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from decoding.grammar.trie import EFGNode, EFGTrie
from models.engine import LogitsProcessorList

if TYPE_CHECKING:
    import torch
    import xgrammar

VLLM_ASYNC_HINT = "load the plugin with --logits-processors, not only through its entry point"


class GrammarState:
    """One sequence's matcher: advanced with the sampled tokens, and the allowed mask at each position.

    Args:
        compiled: the compiled grammar.
        vocab_size: the grammar's vocabulary (logits may be wider: padding is never allowed).
        max_tokens: the sequence's budget; at its last token only ending tokens are allowed.
    """

    def __init__(self, compiled: xgrammar.CompiledGrammar, *, vocab_size: int, max_tokens: int) -> None:
        import xgrammar

        self._xgr = xgrammar
        self.matcher = xgrammar.GrammarMatcher(compiled)
        self.stop_ids = list(self.matcher.stop_token_ids)
        self.vocab_size = vocab_size
        self.max_tokens = max_tokens
        self._bitmask = xgrammar.allocate_token_bitmask(1, vocab_size)
        self._accepted = 0
        self._mask: tuple[int, torch.Tensor] | None = None

    @property
    def ended(self) -> bool:
        """The sequence has emitted an ending token: nothing follows."""
        return self._accepted > 0 and self.matcher.is_terminated()

    def allowed(self, output_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        """The tokens that may follow ``output_ids``, as a mask over ``logits``'s width (computed once)."""
        self._advance(output_ids)
        position = len(output_ids)
        if self._mask is None or self._mask[0] != position:
            self._mask = (position, self._compute_mask(logits))
        return self._mask[1]

    def _advance(self, output_ids: Sequence[int]) -> None:
        for token in output_ids[self._accepted :]:
            if token < 0:
                raise RuntimeError(
                    f"the newest output token is not known yet (vLLM's async scheduling): {VLLM_ASYNC_HINT}"
                )
            if not self.matcher.accept_token(token):
                raise RuntimeError(f"the grammar rejected sampled token {token}")
            self._accepted += 1

    def _compute_mask(self, logits: torch.Tensor) -> torch.Tensor:
        import torch

        width = logits.shape[-1]
        if self.matcher.is_terminated():
            mask = torch.zeros(width, dtype=torch.bool)
            mask[self.stop_ids] = True
            return mask.to(logits.device)
        self.matcher.fill_next_token_bitmask(self._bitmask)
        probe = torch.zeros(1, self.vocab_size)
        self._xgr.apply_token_bitmask_inplace(probe, self._bitmask)
        mask = torch.isfinite(probe[0])
        if width > self.vocab_size:  # padded logits (vLLM)
            mask = torch.cat([mask, torch.zeros(width - self.vocab_size, dtype=torch.bool)])
        mask = mask[:width]
        if self._accepted + 1 >= self.max_tokens:  # the last token: only an ending counts
            ending = torch.zeros_like(mask)
            ending[self.stop_ids] = mask[self.stop_ids]
            mask = ending
        return mask.to(logits.device)


class GCDLogitsProcessor:
    """Grammar-constrained decoding: disallowed tokens get ``-inf``; with none left, the sequence ends."""

    def __init__(self, state: GrammarState) -> None:
        self.state = state

    def __call__(self, output_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        import torch

        masked = logits.masked_fill(~self.state.allowed(output_ids, logits), float("-inf"))
        if bool(torch.isfinite(masked).any()):
            return masked
        # A dead end: nothing grammatical can follow (or none of it has mass left); the output is flagged incomplete.
        forced = logits.new_full(logits.shape, float("-inf"))
        forced[self.state.stop_ids[0]] = 0.0
        return forced


class ASApLogitsProcessor:
    """Grammar-aligned sampling: walks the key's trie along the sequence and tilts each visited child's
    logit by ``log EFG``; expanding a node records its allowed mass, adding a child updates the mass
    its parent has left, and every change propagates to the root.

    Args:
        state: the sequence's grammar state (shared with the mask that follows).
        trie: the key's trie, shared by every sequence of the key.
        lock: guards the trie.
    """

    def __init__(self, state: GrammarState, trie: EFGTrie, lock: threading.RLock) -> None:
        self.state = state
        self.trie = trie
        self.lock = lock
        self.node: EFGNode = trie.root
        self._walked = 0
        self._last: torch.Tensor | None = None
        """The previous position's allowed log-probabilities: what a new child's parent needs."""

    def __call__(self, output_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        import torch

        allowed = self.state.allowed(output_ids, logits)
        if self.state.ended:
            return logits
        # log P(t | prefix) over the grammar's tokens, -inf elsewhere: one vector per position, from which both
        # a new child's log P and a node's unvisited mass are read.
        allowed_log_probs = torch.log_softmax(logits.double(), dim=-1).masked_fill_(~allowed, -math.inf)
        with self.lock:
            self._walk(output_ids)
            node = self.node
            if node.log_unvisited is None:
                self.trie.settle(node, log_unvisited=_unvisited_mass(node, allowed_log_probs))
            tilt = {token: child.log_efg for token, child in node.children.items() if token < logits.shape[-1]}
        self._last = allowed_log_probs
        if not tilt:
            return logits
        tilted = logits.clone()
        tokens = list(tilt)
        tilted[tokens] += torch.tensor(list(tilt.values()), dtype=logits.dtype, device=logits.device)
        return tilted

    def _walk(self, output_ids: Sequence[int]) -> None:
        for token in output_ids[self._walked :]:
            parent = self.node
            assert self._last is not None, "a token was sampled before the processor saw its position"
            if token not in parent.children:
                self.node = self.trie.child(parent, token, float(self._last[token]))
                self.trie.settle(parent, log_unvisited=_unvisited_mass(parent, self._last))
            else:
                self.node = parent.children[token]
            self._walked += 1


def _unvisited_mass(node: EFGNode, allowed_log_probs: torch.Tensor) -> float:
    """log Σ P(t | node) over the allowed tokens without a child, summed afresh (no subtraction): -inf if none."""
    import torch

    visited = [token for token in node.children if token < len(allowed_log_probs)]
    if not visited:  # a node being expanded: every allowed token is unvisited
        return float(torch.logsumexp(allowed_log_probs, dim=0))
    unvisited = allowed_log_probs.index_fill(0, torch.tensor(visited, dtype=torch.long), -math.inf)
    return float(torch.logsumexp(unvisited, dim=0))


def grammar_processors(
    compiled: xgrammar.CompiledGrammar,
    *,
    vocab_size: int,
    max_tokens: int,
    trie: EFGTrie | None = None,
    lock: threading.RLock | None = None,
) -> LogitsProcessorList:
    """One sequence's processors: GCD (``trie`` None) or ASAp over the key's trie."""
    state = GrammarState(compiled, vocab_size=vocab_size, max_tokens=max_tokens)
    if trie is None:
        return LogitsProcessorList([GCDLogitsProcessor(state)])
    return LogitsProcessorList([ASApLogitsProcessor(state, trie, lock or threading.RLock()), GCDLogitsProcessor(state)])
