"""The ``alignment`` object: typed from the registry at the request edge, complete after the profile merge."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from decoding.alignment import AlignmentPatch, parse_alignment
from decoding.registry import METHODS
from models.errors import InvalidRequestError, from_validation_errors

PROFILE = {"nudging": {"nudger": "small-chat", "gamma": 0.4}, "guidelines": {"top_k": 4}}


def edge_error(raw: dict) -> InvalidRequestError:
    with pytest.raises(ValidationError) as info:
        AlignmentPatch.model_validate(raw)
    return from_validation_errors(info.value.errors(), prefix="alignment")


def test_the_schema_documents_every_method_with_its_defaults_bounds_and_required_fields():
    schema = AlignmentPatch.model_json_schema()
    assert set(schema["properties"]) == {*METHODS, "return_details"}
    nudging = schema["$defs"]["NudgingParams"]
    assert nudging["required"] == ["nudger"] and "default" not in nudging["properties"]["nudger"]
    gamma = nudging["properties"]["gamma"]
    assert (gamma["default"], gamma["minimum"], gamma["maximum"]) == (0.4, 0, 1)
    assert schema["$defs"]["BestOfNParams"]["properties"]["lambda"]["exclusiveMinimum"] == 0


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        ({"nudging": {"gamma": 1.5}}, "alignment.nudging.gamma"),
        ({"nudging": {"gamma": None}}, "alignment.nudging.gamma"),
        ({"best_of_n": {"lambda": 0}}, "alignment.best_of_n.lambda"),
        ({"best_of_n": {"reward": []}}, "alignment.best_of_n.reward"),
        ({"grammar": {"syntax": "cfg"}}, "alignment.grammar.syntax"),
        ({"best_of_m": {}}, "alignment.best_of_m"),
        ({"return_details": "yes"}, "alignment.return_details"),
    ],
)
def test_the_edge_refuses_wrong_types_bounds_and_names(raw: dict, param: str):
    assert edge_error(raw).param == param


def test_a_partial_method_passes_the_edge_and_completes_over_its_profile():
    patch = AlignmentPatch.model_validate({"nudging": {"gamma": 0.2}, "return_details": True})
    assert patch.as_sent() == {"nudging": {"gamma": 0.2}, "return_details": True}
    alignment = parse_alignment(patch.as_sent(), PROFILE)
    assert alignment.methods["nudging"].gamma == 0.2  # type: ignore[attr-defined]
    assert alignment.methods["nudging"].nudger == "small-chat" and alignment.return_details  # type: ignore[attr-defined]
    with pytest.raises(InvalidRequestError) as info:
        parse_alignment(patch.as_sent())  # no profile: the nudger is missing
    assert info.value.param == "alignment.nudging.nudger"


def test_cross_field_checks_wait_for_the_merged_object():
    patch = AlignmentPatch.model_validate({"transfer_q": {"mode": "indirect"}})
    profile = {"transfer_q": {"baseline": "b", "reward": "r", "baseline_reward": "rb"}}
    assert parse_alignment(patch.as_sent(), profile).methods["transfer_q"].mode == "indirect"  # type: ignore[attr-defined]
    with pytest.raises(InvalidRequestError, match="baseline_reward"):
        parse_alignment({"transfer_q": {"baseline": "b", "reward": "r", "mode": "indirect"}})


def test_a_grammar_schema_may_be_sent_as_an_object():
    patch = AlignmentPatch.model_validate({"grammar": {"syntax": "json_schema", "grammar": {"type": "object"}}})
    assert patch.as_sent()["grammar"]["grammar"] == '{"type": "object"}'


def test_the_request_order_of_methods_is_kept():
    raw = {"transfer_q": {"baseline": "b", "reward": "r"}, "nudging": {"nudger": "n"}}
    with pytest.raises(InvalidRequestError) as info:
        parse_alignment(AlignmentPatch.model_validate(raw).as_sent())
    assert info.value.param == "alignment.nudging"  # the second strategy named is the one refused
