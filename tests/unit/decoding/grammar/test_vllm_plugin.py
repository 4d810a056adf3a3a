"""The grammar plugin's vLLM adapters, driven the way vLLM's model runners drive them.

The V1 adapter runs on vLLM's own ``AdapterLogitsProcessor`` and ``BatchUpdate``; the
V2 adapter gets the runner's token buffers (committed tokens up to each row's position,
the newest token only in ``input_ids``). Both must give exactly the logits the
per-token core gives for the same history.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import xgrammar

pytest.importorskip("vllm", reason="the plugin runs inside vLLM workers (`pip install -e .[cpu]`)")

from vllm import SamplingParams
from vllm.sampling_params import StructuredOutputsParams
from vllm.v1.sample.logits_processor import BatchUpdate

from decoding.grammar import VLLM_GRAMMAR_PLUGIN, WORKER_ARG, GrammarCompiler, GrammarParams, grammar_processors
from decoding.grammar.vllm_plugin import GrammarLogitsProcessor as PluginProcessor
from decoding.grammar.vllm_plugin import GrammarProcessorV1, GrammarProcessorV2, RequestGrammar
from models.tokenizer import Tokenizer

REGEX = GrammarParams(syntax="regex", grammar="(yes|no)(,(yes|no))*", mode="gcd")
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def tokenizer(tiny_models: Path) -> Tokenizer:
    return Tokenizer(tiny_models / "base", name="tiny-base")


class WorkerConfig:
    """The parts of a ``VllmConfig`` the plugin reads."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.model_config = SimpleNamespace(tokenizer=tokenizer.hf.name_or_path, served_model_name="tiny-base",
                                            get_vocab_size=lambda: tokenizer.vocab_size)  # fmt: skip
        self.speculative_config = None


def worker_config(tokenizer: Tokenizer) -> Any:
    return WorkerConfig(tokenizer)


def request(grammar: GrammarParams = REGEX, **extra: Any) -> SamplingParams:
    return SamplingParams(max_tokens=MAX_TOKENS, extra_args={WORKER_ARG: grammar.model_dump_json(), **extra})


def sample(logits: torch.Tensor, generator: torch.Generator) -> int:
    return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))


def matcher(tokenizer: Tokenizer, grammar: GrammarParams) -> xgrammar.GrammarMatcher:
    compiler = GrammarCompiler(tokenizer.hf, vocab_size=tokenizer.vocab_size, stop_ids=sorted(tokenizer.eos_ids))
    return xgrammar.GrammarMatcher(compiler.compile(grammar))


def run_v1(processor: GrammarProcessorV1, prompts: list[list[int]], params: SamplingParams, eos: int, seed: int):
    """Decodes every prompt to EOS or MAX_TOKENS; finished requests leave the batch as in vLLM."""
    outputs: list[list[int]] = [[] for _ in prompts]
    added = [(i, params, prompt, outputs[i]) for i, prompt in enumerate(prompts)]
    update: BatchUpdate | None = BatchUpdate(batch_size=len(prompts), removed=[], added=added, moved=[])
    generator = torch.Generator().manual_seed(seed)
    active = set(range(len(prompts)))
    rows: list[tuple[list[int], torch.Tensor, torch.Tensor]] = []
    while active:
        processor.update_state(update)
        raw = torch.randn(len(prompts), processor.grammars.compiler.vocab_size, generator=generator)
        processed = processor.apply(raw.clone())
        finished = []
        for i in sorted(active):
            rows.append((list(outputs[i]), raw[i], processed[i]))
            outputs[i].append(sample(processed[i], generator))
            if outputs[i][-1] == eos or len(outputs[i]) == MAX_TOKENS:
                finished.append(i)
        active -= set(finished)
        update = BatchUpdate(batch_size=len(active), removed=finished, added=[], moved=[]) if finished else None
    processor.update_state(update)
    assert not processor.req_info
    return outputs, rows


def test_the_entry_point_builds_the_v1_adapter_for_the_v1_runner_once_per_runner(tokenizer: Tokenizer):
    config = worker_config(tokenizer)
    first = PluginProcessor(config, torch.device("cpu"), False)
    duplicate = PluginProcessor(config, torch.device("cpu"), False)
    assert isinstance(first, GrammarProcessorV1) and first.grammars is not None
    assert duplicate.grammars is None  # loaded twice (entry point + --logits-processors): one instance works
    assert duplicate.new_req_logits_processor(request()) is None
    assert PluginProcessor(worker_config(tokenizer), torch.device("cpu"), False).grammars is not None  # another runner


def test_both_runners_loaders_accept_the_class_named_on_the_command_line():
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.sample.logits_processor import validate_logits_processors_parameters
    from vllm.v1.worker.gpu.sample.logits_processor import build_custom_logits_processors_params_validator

    bad = SamplingParams(extra_args={WORKER_ARG: json.dumps({"syntax": "regex", "grammar": "(a"})})
    v2_validate = build_custom_logits_processors_params_validator([VLLM_GRAMMAR_PLUGIN])
    for validate in (v2_validate, lambda params: validate_logits_processors_parameters([VLLM_GRAMMAR_PLUGIN], params)):
        validate(request())
        with pytest.raises(VLLMValidationError, match="does not compile"):  # vLLM's 400
            validate(bad)


def test_v1_outputs_are_in_the_language_and_equal_the_cores(tokenizer: Tokenizer):
    processor = PluginProcessor(worker_config(tokenizer), torch.device("cpu"), False)
    eos = min(tokenizer.eos_ids)
    prompts = [tokenizer.encode("Answer yes or no:"), tokenizer.encode("Again:"), tokenizer.encode("Once more:")]
    outputs, rows = run_v1(processor, prompts, request(), eos, seed=0)

    compiled = processor.grammars.compiler.compile(REGEX)
    for history, raw, processed in rows:  # each row equals the core's for that history
        reference = grammar_processors(compiled, vocab_size=tokenizer.vocab_size, max_tokens=MAX_TOKENS)
        assert torch.equal(processed, reference(history, raw))
    for output in outputs:
        check = matcher(tokenizer, REGEX)
        assert all(check.accept_token(token) for token in output)
        if output[-1] == eos:
            assert check.is_terminated()


def test_v1_asap_requests_with_one_key_share_a_trie_that_persists(tokenizer: Tokenizer):
    processor = PluginProcessor(worker_config(tokenizer), torch.device("cpu"), False)
    asap = request(REGEX.model_copy(update={"mode": "asap"}))
    prompt = tokenizer.encode("Answer yes or no:")
    run_v1(processor, [prompt, prompt], asap, min(tokenizer.eos_ids), seed=1)
    store = processor.grammars.store
    assert len(store) == 1
    nodes = store.nodes
    run_v1(processor, [prompt], asap, min(tokenizer.eos_ids), seed=2)
    assert len(store) == 1 and store.nodes >= nodes > 1
    run_v1(processor, [tokenizer.encode("Another prompt:")], asap, min(tokenizer.eos_ids), seed=3)
    assert len(store) == 2  # another prompt, another key


class RunnerState:
    """The V2 runner's buffers for ``slots`` request slots."""

    def __init__(self, slots: int, width: int) -> None:
        self.all_token_ids = SimpleNamespace(gpu=torch.full((slots, width), -1, dtype=torch.int64))
        self.prompt_len = SimpleNamespace(np=np.zeros(slots, dtype=np.int32))

    def admit(self, slot: int, prompt: list[int]) -> None:
        self.all_token_ids.gpu[slot] = -1
        self.all_token_ids.gpu[slot, : len(prompt)] = torch.tensor(prompt)
        self.prompt_len.np[slot] = len(prompt)

    def context(self, sequences: dict[int, list[int]]) -> SimpleNamespace:
        """One step, rows in reverse slot order; the newest token is not committed yet."""
        slots = sorted(sequences, reverse=True)
        for slot in slots:
            committed = sequences[slot][:-1]
            self.all_token_ids.gpu[slot, : len(committed)] = torch.tensor(committed)
            self.all_token_ids.gpu[slot, len(committed)] = -1
        return SimpleNamespace(
            expanded_idx_mapping=torch.tensor(slots),
            pos=torch.tensor([len(sequences[slot]) - 1 for slot in slots]),
            input_ids=torch.tensor([sequences[slot][-1] for slot in slots]),
        )


def test_v2_reads_the_runners_buffers_and_equals_the_core(tokenizer: Tokenizer):
    state = RunnerState(slots=4, width=64)
    processor = PluginProcessor(worker_config(tokenizer), state)  # type: ignore[arg-type]
    assert isinstance(processor, GrammarProcessorV2)
    prompts = {3: tokenizer.encode("Answer yes or no:"), 1: tokenizer.encode("Again:")}
    assert processor.add_request(0, SamplingParams(max_tokens=MAX_TOKENS)) is False  # no grammar: untouched
    for slot, prompt in prompts.items():
        state.admit(slot, prompt)
        assert processor.add_request(slot, request())
    compiled = processor.grammars.compiler.compile(REGEX)
    sequences = {slot: list(prompt) for slot, prompt in prompts.items()}
    generator = torch.Generator().manual_seed(0)
    for _ in range(MAX_TOKENS):
        ctx = state.context(sequences)
        raw = torch.randn(len(sequences), tokenizer.vocab_size, generator=generator)
        processed = processor.apply(raw.clone(), ctx)  # type: ignore[arg-type]
        for row, slot in enumerate(ctx.expanded_idx_mapping.tolist()):
            reference = grammar_processors(compiled, vocab_size=tokenizer.vocab_size, max_tokens=MAX_TOKENS)
            assert torch.equal(processed[row], reference(sequences[slot][len(prompts[slot]) :], raw[row]))
            sequences[slot].append(sample(processed[row], generator))
        sequences = {slot: s for slot, s in sequences.items() if s[-1] not in tokenizer.eos_ids}
        if not sequences:
            break


def test_v2_skips_rows_of_a_partial_prefill_and_resets_recycled_slots(tokenizer: Tokenizer):
    state = RunnerState(slots=2, width=64)
    processor = PluginProcessor(worker_config(tokenizer), state)  # type: ignore[arg-type]
    prompt = tokenizer.encode("Answer yes or no, please, in one word:")
    state.admit(0, prompt)
    processor.add_request(0, request())
    chunk = SimpleNamespace(expanded_idx_mapping=torch.tensor([0]), pos=torch.tensor([2]),
                            input_ids=torch.tensor([prompt[2]]))  # fmt: skip
    raw = torch.randn(1, tokenizer.vocab_size)
    assert torch.equal(processor.apply(raw.clone(), chunk), raw)  # type: ignore[arg-type]
    assert processor.add_request(0, SamplingParams(max_tokens=4)) is False
    assert processor.requests == {}


@pytest.mark.parametrize(
    ("extra_args", "message"),
    [
        ({WORKER_ARG: json.dumps({"syntax": "regex", "grammar": "(a"})}, "does not compile: Regex parsing error"),
        ({WORKER_ARG: "not json"}, "is not a valid alignd grammar"),
        ({WORKER_ARG: json.dumps({"syntax": "yaml", "grammar": "a"})}, "is not a valid alignd grammar"),
    ],
)
def test_validate_params_rejects_bad_grammars_so_vllm_answers_400(extra_args: dict[str, str], message: str):
    with pytest.raises(ValueError, match=message):
        PluginProcessor.validate_params(SamplingParams(extra_args=extra_args))


def test_validate_params_rejects_the_grammar_with_vllms_structured_outputs():
    params = request()
    params.structured_outputs = StructuredOutputsParams(regex="a+")
    with pytest.raises(ValueError, match="structured outputs"):
        PluginProcessor.validate_params(params)
    PluginProcessor.validate_params(SamplingParams())  # requests without a grammar pass


def test_a_failing_sequence_ends_with_eos_instead_of_stopping_the_engine(tokenizer: Tokenizer):
    processor = PluginProcessor(worker_config(tokenizer), torch.device("cpu"), False)
    grammar = processor.new_req_logits_processor(request())
    assert isinstance(grammar, RequestGrammar)
    rejected = tokenizer.encode("maybe", add_special_tokens=False)  # not a prefix of the language
    ended = grammar([1, 2], rejected, torch.randn(tokenizer.vocab_size))
    assert grammar.failed and int(ended.argmax()) == min(tokenizer.eos_ids) and torch.isinf(ended).sum() > 0


def test_the_plugin_imports_only_what_the_vllm_image_provides():
    gateway_only = ["fastapi", "uvicorn", "pydantic_settings", "prometheus_client", "rapidfuzz",
                    "sentence_transformers", "server"]  # fmt: skip
    code = f"import sys\nfor name in {gateway_only!r}: sys.modules[name] = None\nimport decoding.grammar.vllm_plugin\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
