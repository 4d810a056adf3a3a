"""Where the grammar runs (in-process processors or the workers' plugin), and what the gateway learns from
each output."""

from __future__ import annotations

import pytest

from decoding.alignment import parse_alignment
from decoding.base import Candidate, PromptInput
from decoding.grammar import WORKER_ARG, GrammarConstraint, GrammarParams, GrammarService
from decoding.pipeline import AlignedRequest
from models.engine import SamplingParams
from models.errors import InvalidRequestError, UpstreamError
from tests.fakes import CategoricalEngine, FakeResources, make_pipeline
from tests.unit.decoding.grammar.toy import GRAMMAR, MAX_TOKENS, STOP, toy_compiler


def toy_constraint(mode: str, *, in_workers: bool) -> GrammarConstraint:
    return GrammarService().constraint(
        "toy", toy_compiler(), GRAMMAR.model_copy(update={"mode": mode}), prompt_ids=[0],
        sampling=SamplingParams(max_tokens=MAX_TOKENS), stop_ids=frozenset({STOP}), in_workers=in_workers,
    )  # fmt: skip


def test_in_workers_the_grammar_travels_as_vllm_xargs_and_asap_pins_one_replica():
    for mode in ("asap", "gcd"):
        constraint = toy_constraint(mode, in_workers=True)
        sampling = constraint.apply(SamplingParams(max_tokens=MAX_TOKENS))
        assert GrammarParams.model_validate_json(sampling.worker_args[WORKER_ARG]) == constraint.params
        assert sampling.affinity == (constraint.key if mode == "asap" else None)
        assert sampling.logits_processors == () and constraint.trie is None  # the worker holds the trie
    in_process = toy_constraint("asap", in_workers=False).apply(SamplingParams())
    assert in_process.worker_args == {} and len(in_process.logits_processors) == 1


def test_replaying_an_output_tells_complete_from_cut_off_and_catches_an_unconstrained_worker():
    constraint = toy_constraint("gcd", in_workers=True)
    assert constraint.details([1, 0, 1, 1, 0, STOP]).complete
    assert constraint.details([1, 0, 1, 1, 0]).complete  # a whole sentence, cut at max_tokens exactly
    assert not constraint.details([0, 0]).complete  # cut off
    assert not constraint.details([0, 0, STOP]).complete  # ended early at a dead end
    with pytest.raises(UpstreamError, match="grammar plugin"):
        constraint.details([0, 1, 0])


def test_a_review_flags_a_cut_off_output_as_length():
    constraint = toy_constraint("asap", in_workers=False)
    cut, whole = Candidate("00", [0, 0], "stop"), Candidate("10110", [1, 0, 1, 1, 0, STOP], "stop")
    constraint.review(cut)
    constraint.review(whole)
    assert cut.finish_reason == "length" and not cut.details["grammar"].complete  # type: ignore[attr-defined]
    assert whole.finish_reason == "stop" and whole.details["grammar"].trie_key == constraint.key  # type: ignore[attr-defined]


async def test_a_model_without_processors_or_the_plugin_is_a_400():
    request = AlignedRequest(
        engine=CategoricalEngine({"a": 1.0}),
        prompt=PromptInput(text="x"),
        sampling=SamplingParams(),
        alignment=parse_alignment({"grammar": {"syntax": "regex", "grammar": "a"}}),
    )
    with pytest.raises(InvalidRequestError, match="grammar plugin") as error:
        await make_pipeline(FakeResources()).prepare(request)
    assert error.value.param == "alignment.grammar"
