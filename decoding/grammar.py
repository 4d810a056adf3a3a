"""Grammar-constrained decoding (GCD) and grammar-aligned sampling (ASAp; Park et al. 2024).

GCD masks the tokens that cannot continue a grammatical output and renormalises;
that distorts the distribution away from ``Q(w) ∝ P(w) · 1[w ∈ L(G)]``. ASAp keeps,
per (model, prompt, grammar, sampling settings), a trie of visited prefixes with an
over-approximation of the expected future grammaticality ``EFG(u)`` (initially 1)
and samples ``∝ P(t | u) · EFG(u t)`` over the allowed tokens, with ``P`` the raw,
unmasked temperature-1 probabilities. Each node stores its allowed mass ``A`` and
only its visited children, so ``EFG(u) = A - Σ_visited P(c) · (1 - EFG(c))``; a dead
end (empty mask) or a length cut-off counts as 0, and values are updated up the
sampled path as soon as they change. EFG only decreases, so stale reads under
concurrency stay upper bounds.

Masks come from xgrammar (what vLLM uses) for EBNF, JSON schema, regex and Lark.

Where it runs: inside the in-process engine (``GrammarLogitsProcessor`` per sample),
or inside vLLM workers through ``decoding.vllm_plugin`` (the same core; the request's
``GrammarParams`` travel as ``vllm_xargs``). Either way the gateway replays each
output through its own matcher to tell complete sentences from cut-off ones.

Temperature: EFG is defined on temperature-1 probabilities and always computed from
them; the engine then applies the request's temperature and top-p to the reweighted
logits. Only temperature 1 and top-p 1 target ``Q`` exactly; other settings get
their own trie (they are part of its key).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field, field_validator

from decoding.base import MethodParams
from models.engine import SamplingParams
from models.errors import InvalidRequestError, UpstreamError

if TYPE_CHECKING:
    import torch
    import xgrammar

Syntax = Literal["ebnf", "json_schema", "regex", "lark"]

WORKER_ARG = "alignd_grammar"
"""The ``vllm_xargs`` key carrying a request's ``GrammarParams`` (JSON) to vLLM workers."""
VLLM_GRAMMAR_PLUGIN = "decoding.vllm_plugin:GrammarLogitsProcessor"
"""What vLLM's ``--logits-processors`` names to load the plugin."""


class GrammarParams(MethodParams):
    """``alignment.grammar`` (also set by OpenAI's ``response_format``)."""

    syntax: Syntax = "ebnf"
    grammar: str = Field(min_length=1, description="The grammar, schema (JSON text or object) or regex.")
    mode: Literal["asap", "gcd"] = "asap"

    @field_validator("grammar", mode="before")
    @classmethod
    def _schema_as_text(cls, value: Any) -> Any:
        return json.dumps(value, sort_keys=True) if isinstance(value, dict) else value

    @property
    def digest(self) -> str:
        return hashlib.sha256(f"{self.syntax}\x00{self.grammar}".encode()).hexdigest()[:16]


class GrammarDetails(BaseModel):
    mode: str
    syntax: str
    grammar_hash: str
    complete: bool = Field(description="The output is a complete sentence of the grammar.")
    trie_nodes: int | None = Field(default=None, description="ASAp: nodes in this key's trie after the request.")
    root_efg: float | None = Field(default=None, description="ASAp: the learned upper bound on P(L) at the root.")


# The trie -------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Node:
    parent: _Node | None
    token: int | None
    allowed_mass: float | None = None
    efg: float = 1.0
    children: dict[int, tuple[float, _Node]] = field(default_factory=dict)

    def recompute(self) -> None:
        if self.allowed_mass is None:
            return
        lost = sum(p * (1.0 - child.efg) for p, child in self.children.values())
        self.efg = max(0.0, min(self.efg, self.allowed_mass - lost))


class EFGTrie:
    """Visited prefixes of one key with their EFG upper bounds (float64)."""

    def __init__(self) -> None:
        self.root = _Node(None, None)
        self.size = 1

    def child(self, node: _Node, token: int, probability: float) -> _Node:
        if token not in node.children:
            node.children[token] = (probability, _Node(node, token))
            self.size += 1
        return node.children[token][1]

    def efg_of_children(self, node: _Node) -> dict[int, float]:
        return {token: child.efg for token, (_, child) in node.children.items()}

    @staticmethod
    def settle(node: _Node, efg: float | None = None) -> None:
        """Sets a node's own value (dead end, cut-off: 0) and updates its ancestors."""
        if efg is not None:
            node.efg = min(node.efg, efg)
        current = node.parent
        while current is not None:
            current.recompute()
            current = current.parent


class EFGStore:
    """Tries by key, least recently used first out once the node budget is exceeded; thread-safe."""

    def __init__(self, max_nodes: int = 1_000_000) -> None:
        self.max_nodes = max_nodes
        self._tries: OrderedDict[str, EFGTrie] = OrderedDict()
        self.lock = threading.RLock()

    def trie(self, key: str) -> EFGTrie:
        with self.lock:
            trie = self._tries.get(key)
            if trie is None:
                trie = self._tries[key] = EFGTrie()
            self._tries.move_to_end(key)
            self._evict(keep=key)
            return trie

    def _evict(self, keep: str) -> None:
        while self.nodes > self.max_nodes and len(self._tries) > 1:
            oldest = next(iter(self._tries))
            if oldest == keep:
                self._tries.move_to_end(oldest)
                continue
            del self._tries[oldest]

    @property
    def nodes(self) -> int:
        return sum(trie.size for trie in self._tries.values())

    def __len__(self) -> int:
        return len(self._tries)

    def __contains__(self, key: str) -> bool:
        return key in self._tries


def trie_key(model: str, prompt_ids: Sequence[int], params: GrammarParams, temperature: float, top_p: float) -> str:
    prompt = hashlib.sha256(",".join(map(str, prompt_ids)).encode()).hexdigest()[:16]
    return f"{model}/{prompt}/{params.digest}/t{temperature}/p{top_p}"


# The per-token core ------------------------------------------------------------


class GrammarLogitsProcessor:
    """One sequence's grammar processor: GCD (``trie`` None) or ASAp (with the key's trie).

    Args:
        compiled: the compiled grammar (xgrammar).
        vocab_size: the logits' width.
        max_tokens: the sequence's budget; at its last token only ending tokens survive.
        trie: ASAp's trie for this key, or None for GCD.
        lock: guards the trie (shared across concurrent sequences).
    """

    def __init__(
        self,
        compiled: xgrammar.CompiledGrammar,
        *,
        vocab_size: int,
        max_tokens: int,
        trie: EFGTrie | None = None,
        lock: threading.RLock | None = None,
    ) -> None:
        import xgrammar

        self._xgr = xgrammar
        self.matcher = xgrammar.GrammarMatcher(compiled)
        self.stop_ids = list(self.matcher.stop_token_ids)
        self.vocab_size = vocab_size
        self.max_tokens = max_tokens
        self.trie = trie
        self.lock = lock or threading.RLock()
        self.node = trie.root if trie is not None else None
        self._bitmask = xgrammar.allocate_token_bitmask(1, vocab_size)
        self._accepted = 0
        self._last_probabilities: torch.Tensor | None = None

    def __call__(self, output_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        import torch

        self._advance(output_ids)
        allowed = self._allowed_mask(logits)
        if len(output_ids) + 1 >= self.max_tokens:  # the last token: only an ending counts
            ending = torch.zeros_like(allowed)
            ending[self.stop_ids] = allowed[self.stop_ids]
            allowed = ending
        if not bool(allowed.any()):
            return self._dead_end(logits)
        if self.trie is None:
            return logits.masked_fill(~allowed, float("-inf"))
        return self._asap(logits, allowed)

    def _advance(self, output_ids: Sequence[int]) -> None:
        """Feeds the matcher (and walks the trie) with the tokens sampled since the last call."""
        for token in output_ids[self._accepted :]:
            if token < 0:
                raise RuntimeError(
                    "the newest output token is not known yet (vLLM's async scheduling): load the plugin with "
                    f"--logits-processors {VLLM_GRAMMAR_PLUGIN}, not only through its entry point"
                )
            if not self.matcher.accept_token(token):
                raise RuntimeError(f"the grammar rejected sampled token {token}")
            if self.trie is not None and self.node is not None and self._last_probabilities is not None:
                with self.lock:
                    probability = float(self._last_probabilities[token])
                    self.node = self.trie.child(self.node, token, probability)
                    if token in self.stop_ids:
                        self.trie.settle(self.node)  # a complete sentence: EFG 1
        self._accepted = len(output_ids)

    def _allowed_mask(self, logits: torch.Tensor) -> torch.Tensor:
        import torch

        if self.matcher.is_terminated():
            mask = torch.zeros(logits.shape[-1], dtype=torch.bool)
            mask[self.stop_ids] = True
            return mask.to(logits.device)
        self.matcher.fill_next_token_bitmask(self._bitmask)
        probe = torch.zeros(1, self.vocab_size)
        self._xgr.apply_token_bitmask_inplace(probe, self._bitmask)
        mask = torch.isfinite(probe[0])
        if logits.shape[-1] > self.vocab_size:  # padded logits (vLLM): the padding is never allowed
            mask = torch.cat([mask, torch.zeros(logits.shape[-1] - self.vocab_size, dtype=torch.bool)])
        return mask[: logits.shape[-1]].to(logits.device)

    def _asap(self, logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        import torch

        probabilities = torch.softmax(logits.double(), dim=-1)  # raw, unmasked, temperature 1
        weights = probabilities * allowed
        assert self.trie is not None and self.node is not None
        with self.lock:
            node = self.node
            if node.allowed_mass is None:
                node.allowed_mass = float(weights.sum())
                node.recompute()
                self.trie.settle(node)
            for token, efg in self.trie.efg_of_children(node).items():
                weights[token] *= efg
        self._last_probabilities = probabilities
        if not bool((weights > 0).any()):
            return self._dead_end(logits)
        return torch.log(weights).to(logits.dtype)

    def _dead_end(self, logits: torch.Tensor) -> torch.Tensor:
        """Nothing grammatical can follow: EFG 0 here; the sequence ends (flagged incomplete)."""
        if self.trie is not None and self.node is not None:
            with self.lock:
                self.trie.settle(self.node, 0.0)
        forced = logits.new_full(logits.shape, float("-inf"))
        forced[self.stop_ids[0]] = 0.0
        return forced


# Compilation -------------------------------------------------------------------


class GrammarCompiler:
    """Compiles grammars for one tokenizer (xgrammar caches compiled grammars).

    Args:
        tokenizer: a Hugging Face tokenizer, or an ``xgrammar.TokenizerInfo``.
        vocab_size: the model's logits width.
        stop_ids: the model's end-of-sequence ids.
        max_grammar_bytes: larger grammars are rejected.
    """

    def __init__(
        self, tokenizer: Any, *, vocab_size: int, stop_ids: Sequence[int], max_grammar_bytes: int = 65_536
    ) -> None:
        import xgrammar

        if isinstance(tokenizer, xgrammar.TokenizerInfo):
            info = tokenizer
        else:
            info = xgrammar.TokenizerInfo.from_huggingface(
                tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_ids)
            )
        self.vocab_size = info.vocab_size
        self.max_grammar_bytes = max_grammar_bytes
        self._compiler = xgrammar.GrammarCompiler(info)

    def compile(self, params: GrammarParams) -> xgrammar.CompiledGrammar:
        if len(params.grammar.encode()) > self.max_grammar_bytes:
            raise InvalidRequestError(
                f"The grammar is {len(params.grammar.encode())} bytes; this server accepts at most "
                f"{self.max_grammar_bytes}.",
                param="alignment.grammar.grammar",
            )
        compile_by_syntax: dict[str, Callable[[str], xgrammar.CompiledGrammar]] = {
            "ebnf": self._compiler.compile_grammar,
            "json_schema": self._compiler.compile_json_schema,
            "regex": self._compiler.compile_regex,
            "lark": self._compiler.compile_lark,
        }
        try:
            return compile_by_syntax[params.syntax](params.grammar)
        except (RuntimeError, ValueError) as exc:
            raise InvalidRequestError(
                f"The {params.syntax} grammar does not compile: {compiler_message(exc)}",
                param="alignment.grammar.grammar",
            ) from exc


def parse_grammar(params: GrammarParams) -> None:
    """Parses the grammar without a tokenizer (what workers check at admission); raises ValueError."""
    import xgrammar

    parse_by_syntax: dict[str, Callable[[str], xgrammar.Grammar]] = {
        "ebnf": xgrammar.Grammar.from_ebnf,
        "json_schema": xgrammar.Grammar.from_json_schema,
        "regex": xgrammar.Grammar.from_regex,
        "lark": xgrammar.Grammar.from_lark,
    }
    try:
        parse_by_syntax[params.syntax](params.grammar)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"The {params.syntax} grammar does not compile: {compiler_message(exc)}") from exc


def compiler_message(exc: Exception) -> str:
    """xgrammar's message without its ``[time] file.cc:line:`` prefix."""
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return re.sub(r"^\[[\d:.]+\] \S+:\d+: ", "", first_line)


def response_format_grammar(response_format: dict[str, Any]) -> GrammarParams | None:
    """OpenAI's ``response_format`` as a (GCD, like OpenAI's) grammar."""
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarParams(syntax="json_schema", grammar='{"type": "object"}', mode="gcd")
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise InvalidRequestError("`response_format.json_schema.schema` must be an object.",
                                      param="response_format.json_schema.schema")  # fmt: skip
        return GrammarParams(syntax="json_schema", grammar=json.dumps(schema, sort_keys=True), mode="gcd")
    raise InvalidRequestError(
        f"`response_format.type` must be text, json_object or json_schema, got {kind!r}.", param="response_format"
    )


# In the pipeline -------------------------------------------------------------------


class GrammarConstraint:
    """One request's grammar: where it runs (the in-process engine, or the vLLM workers' plugin) and,
    per sample, whether the output is a complete sentence (the output replayed through a matcher)."""

    def __init__(
        self,
        params: GrammarParams,
        compiled: xgrammar.CompiledGrammar,
        *,
        vocab_size: int,
        max_tokens: int,
        stop_ids: frozenset[int],
        trie: EFGTrie | None,
        lock: threading.RLock,
        key: str,
        in_workers: bool,
    ) -> None:
        self.params = params
        self.compiled = compiled
        self.vocab_size = vocab_size
        self.max_tokens = max_tokens
        self.stop_ids = stop_ids
        self.trie = trie
        self.lock = lock
        self.key = key
        self.in_workers = in_workers

    def apply(self, sampling: SamplingParams) -> SamplingParams:
        """The sampling settings that run this grammar in the generating engine."""
        if self.in_workers:
            # ASAp's trie lives in one worker: the same key always goes to the same replica.
            affinity = self.key if self.params.mode == "asap" else None
            return replace(sampling, worker_args={WORKER_ARG: self.params.model_dump_json()}, affinity=affinity)
        return replace(sampling, logits_processors=(self.make_processor,))

    def make_processor(self) -> GrammarLogitsProcessor:
        return GrammarLogitsProcessor(
            self.compiled, vocab_size=self.vocab_size, max_tokens=self.max_tokens, trie=self.trie, lock=self.lock
        )

    def details(self, token_ids: Sequence[int]) -> GrammarDetails:
        complete = self._is_complete(token_ids)
        with self.lock:
            return GrammarDetails(
                mode=self.params.mode,
                syntax=self.params.syntax,
                grammar_hash=self.params.digest,
                complete=complete,
                trie_nodes=None if self.trie is None else self.trie.size,
                root_efg=None if self.trie is None else self.trie.root.efg,
            )

    def _is_complete(self, token_ids: Sequence[int]) -> bool:
        import xgrammar

        matcher = xgrammar.GrammarMatcher(self.compiled)
        for position, token in enumerate(token_ids):
            if matcher.accept_token(token):
                continue
            if token in self.stop_ids and position == len(token_ids) - 1:
                return False  # a dead end: the processor ended the sequence early
            raise UpstreamError(
                f"The model sampled token {token}, which the grammar does not allow: its workers do not run "
                f"alignd's grammar plugin (start vLLM with `--logits-processors {VLLM_GRAMMAR_PLUGIN}`)."
            )
        return matcher.is_terminated() or matcher.is_completed()


class GrammarService:
    """Compilers per model and the ASAp trie store, shared by all requests of a server.

    Args:
        max_grammar_bytes: larger grammars are a 400.
        max_trie_nodes: the node budget of the ASAp store (LRU over keys).
    """

    def __init__(self, *, max_grammar_bytes: int = 65_536, max_trie_nodes: int = 1_000_000) -> None:
        self.store = EFGStore(max_trie_nodes)
        self.max_grammar_bytes = max_grammar_bytes
        self._compilers: dict[str, GrammarCompiler] = {}
        self._lock = threading.Lock()

    def compiler(self, model: str, tokenizer: Any, vocab_size: int, stop_ids: Sequence[int]) -> GrammarCompiler:
        with self._lock:
            if model not in self._compilers:
                self._compilers[model] = GrammarCompiler(
                    tokenizer, vocab_size=vocab_size, stop_ids=stop_ids, max_grammar_bytes=self.max_grammar_bytes
                )
            return self._compilers[model]

    def constraint(
        self,
        model: str,
        compiler: GrammarCompiler,
        params: GrammarParams,
        *,
        prompt_ids: Sequence[int],
        sampling: SamplingParams,
        stop_ids: frozenset[int],
        in_workers: bool,
    ) -> GrammarConstraint:
        """Compiled here in every case: a bad grammar is a 400 before any engine call."""
        compiled = compiler.compile(params)
        key = trie_key(model, prompt_ids, params, sampling.temperature, sampling.top_p)
        trie = self.store.trie(key) if params.mode == "asap" and not in_workers else None
        return GrammarConstraint(
            params, compiled, vocab_size=compiler.vocab_size, max_tokens=sampling.max_tokens, stop_ids=stop_ids,
            trie=trie, lock=self.store.lock, key=key, in_workers=in_workers,
        )  # fmt: skip


def worker_grammar(extra_args: Mapping[str, Any] | None) -> GrammarParams | None:
    """A vLLM request's grammar from its ``vllm_xargs`` (None: it has none); raises ValueError."""
    if not extra_args or WORKER_ARG not in extra_args:
        return None
    try:
        params = GrammarParams.model_validate_json(extra_args[WORKER_ARG])
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise ValueError(f"`vllm_xargs.{WORKER_ARG}` is not a valid alignd grammar: {exc}") from exc
    parse_grammar(params)
    return params
