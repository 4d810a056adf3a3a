"""A request's grammar in the pipeline: where it runs, and what each output says about it."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from decoding.base import Candidate, GenerationJob
from decoding.grammar.compiler import GrammarCompiler
from decoding.grammar.params import VLLM_GRAMMAR_PLUGIN, WORKER_ARG, GrammarDetails, GrammarParams
from decoding.grammar.processors import grammar_processors
from decoding.grammar.trie import EFGStore, EFGTrie, trie_key
from decoding.stages import Services
from models.engine import LogitsProcessor, SamplingParams
from models.errors import InvalidRequestError, UpstreamError

if TYPE_CHECKING:
    import xgrammar


class GrammarConstraint:
    """One request's grammar: in the in-process engine's processors, or in the vLLM workers' plugin; and,
    per finished sample, whether it is a complete sentence (the output replayed through a matcher)."""

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
        if self.in_workers:
            # ASAp's trie lives in one worker: the same key always goes to the same replica.
            affinity = self.key if self.params.mode == "asap" else None
            return replace(sampling, worker_args={WORKER_ARG: self.params.model_dump_json()}, affinity=affinity)
        return replace(sampling, logits_processors=(self.make_processor,))

    def make_processor(self) -> LogitsProcessor:
        return grammar_processors(
            self.compiled, vocab_size=self.vocab_size, max_tokens=self.max_tokens, trie=self.trie, lock=self.lock
        )

    def review(self, candidate: Candidate) -> None:
        grammar = self.details(candidate.token_ids)
        candidate.details["grammar"] = grammar
        if not grammar.complete:
            candidate.finish_reason = "length"  # cut off before the grammar could complete

    def details(self, token_ids: Sequence[int]) -> GrammarDetails:
        complete = self._is_complete(token_ids)
        asap = self.params.mode == "asap"
        with self.lock:
            return GrammarDetails(
                mode=self.params.mode,
                syntax=self.params.syntax,
                grammar_hash=self.params.digest,
                complete=complete,
                trie_key=self.key if asap else None,
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
        key = trie_key(model, prompt_ids, params, temperature=sampling.temperature, top_p=sampling.top_p,
                       max_tokens=sampling.max_tokens)  # fmt: skip
        trie = None
        if params.mode == "asap" and not in_workers:
            trie = self.store.trie(key, model=model, params=params, max_tokens=sampling.max_tokens)
        return GrammarConstraint(
            params, compiled, vocab_size=compiler.vocab_size, max_tokens=sampling.max_tokens, stop_ids=stop_ids,
            trie=trie, lock=self.store.lock, key=key, in_workers=in_workers,
        )  # fmt: skip


class GrammarStage:
    """The grammar as the pipeline's processor stage: it runs inside the generating engine."""

    def constrain(self, params: GrammarParams, job: GenerationJob, services: Services) -> GrammarConstraint:
        info = job.engine.info
        in_workers = "grammar" in info.worker_plugins
        if not (info.supports_logits_processors or in_workers):
            raise InvalidRequestError(
                f"The model `{info.name}` cannot run grammar processors: its vLLM workers do not load alignd's "
                "grammar plugin (`vllm.grammar_plugin: false`).",
                param="alignment.grammar",
            )
        grammars = services.get(GrammarService)
        stop_ids = sorted(info.eos_token_ids)
        compiler = grammars.compiler(info.name, job.engine.tokenizer.hf, info.vocab_size, stop_ids)
        return grammars.constraint(
            info.name, compiler, params, prompt_ids=job.prompt_ids, sampling=job.sampling,
            stop_ids=info.eos_token_ids, in_workers=in_workers,
        )  # fmt: skip
