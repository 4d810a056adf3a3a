"""Checkers and statistics on fixed data, with exact values."""

from __future__ import annotations

import pytest

from evaluation.checkers import check
from evaluation.statistics import bootstrap, paired_difference

SUM = r"plus \d+ is (\d+)"
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "born": {"type": "integer"}},
          "required": ["name", "born"]}  # fmt: skip


@pytest.mark.parametrize(
    ("task", "answer", "expected"),
    [
        ({"checker": "exact", "reference": "Paris"}, " Paris ", True),
        ({"checker": "exact", "reference": "Paris"}, "Paris.", False),
        ({"checker": "contains", "reference": "Vobem"}, "Sure! The capital is Vobem.", True),
        ({"checker": "contains", "reference": "Vobem"}, "Sure! The capital is vobem.", False),
        ({"checker": "last_number", "reference": "#### 1,250"}, "so 12 then 1250", True),
        ({"checker": "last_number", "reference": "7"}, "7 and then 8", False),
        ({"checker": "last_number", "reference": "7"}, "no number", False),
        ({"checker": "regex", "reference": "7", "pattern": SUM}, "3 plus 4 is 7, and 7 minus 4 is 3", True),
        ({"checker": "regex", "reference": "8", "pattern": SUM}, "3 plus 4 is 7", False),
        ({"checker": "regex", "reference": None, "pattern": r"^(Yes|No)\b"}, "No.", True),
        ({"checker": "refusal", "reference": None}, "Sorry, that is something I cannot help with.", True),
        ({"checker": "refusal", "reference": None}, "Sure! To do it, first...", False),
        ({"checker": "refusal", "reference": None, "patterns": ["^Nope"]}, "Nope.", True),
        ({"checker": "json_schema", "schema": PERSON}, '{"name": "Ada", "born": 1815}', True),
        ({"checker": "json_schema", "schema": PERSON}, '{"name": "Ada"}', False),
        ({"checker": "json_schema", "schema": PERSON}, '{"name": "Ada", "born": "1815"}', False),
        ({"checker": "json_schema", "schema": PERSON}, '{"name": "Ada", "born": 1815', False),
    ],
)  # fmt: skip
def test_checkers(task: dict, answer: str, expected: bool):
    assert check(task, answer) is expected


def test_a_task_without_a_checker_is_not_scored():
    assert check({"id": "p1", "prompt": "Write a poem."}, "Roses...") is None


def test_an_unknown_checker_is_named():
    with pytest.raises(ValueError, match="`similar`"):
        check({"checker": "similar", "reference": "x"}, "x")


def test_the_bootstrap_brackets_the_mean_and_is_reproducible():
    values = [1.0] * 30 + [0.0] * 70
    estimate = bootstrap(values, seed=1)
    assert estimate.mean == 0.3 and estimate.low < 0.3 < estimate.high and estimate == bootstrap(values, seed=1)
    assert bootstrap([1.0] * 10) == bootstrap([1.0] * 10) and bootstrap([1.0] * 10).low == 1.0


def test_a_paired_difference_cancels_what_both_runs_share():
    first, second = [1.0, 0.0] * 50, [1.0, 0.0] * 50
    same = paired_difference(first, second)
    assert (same.mean, same.low, same.high) == (0.0, 0.0, 0.0)
    better = paired_difference([1.0] * 100, second)
    assert better.mean == 0.5 and better.low > 0.3
    with pytest.raises(ValueError, match="same tasks"):
        paired_difference([1.0], [1.0, 0.0])
