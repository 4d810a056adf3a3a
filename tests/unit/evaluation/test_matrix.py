"""Matrices: grids expand into named configurations; what cannot run is refused before any request."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from decoding.alignment import parse_alignment
from evaluation.matrix import MatrixError, load_matrix, parse_matrix
from loadtest.methods_bench import GROUPS
from server.config import Settings

BASELINES: dict[str, Any] = {
    "reward": {"scorers": ["rm"], "model": "base"},
    "base": {"model": "base", "route": "completions"},
    "aligned": {"model": "chat"},
    "sampling": {"max_tokens": 32},
}


def test_grids_expand_into_their_product_after_the_baselines():
    matrix = parse_matrix({**BASELINES, "configurations": [
        {"name": "bon", "model": "base", "alignment": {"best_of_n": {"reward": "rm"}},
         "grid": {"best_of_n.n": [1, 4], "sampling.temperature": [0.7, 1.0]}, "categories": ["math"]},
        {"name": "nudged", "model": "base", "alignment": {"nudging": {"nudger": "chat", "gamma": 0.4}}},
    ]})  # fmt: skip
    configurations = matrix.expand()
    assert [c.name for c in configurations] == [
        "base", "aligned", "bon[n=1,temperature=0.7]", "bon[n=1,temperature=1.0]", "bon[n=4,temperature=0.7]",
        "bon[n=4,temperature=1.0]", "nudged",
    ]  # fmt: skip
    third = configurations[3]
    assert third.alignment == {"best_of_n": {"reward": "rm", "n": 1}}
    assert third.sampling == {"max_tokens": 32, "temperature": 1.0}
    assert (third.method, third.grid, third.categories, third.role) == (
        "bon", {"best_of_n.n": 1, "sampling.temperature": 1.0}, ("math",), None,
    )  # fmt: skip
    assert [c.role for c in configurations[:2]] == ["base", "aligned"]
    assert matrix.models() == {"base", "chat"}
    assert configurations[2].fingerprint != configurations[3].fingerprint


def test_a_category_pattern_selects_tasks():
    guided = {"name": "g", "model": "chat", "alignment": {"guidelines": {}}, "categories": ["rule-*"]}
    [_, _, guided] = parse_matrix({**BASELINES, "configurations": [guided]}).expand()
    assert guided.applies_to({"category": "rule-money"}) and not guided.applies_to({"category": "capital"})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"aligned": None}, "aligned"),
        ({"configurations": [{"model": "base", "grid": {"nudging.gamma": [0.2]}}]},
         "grid key `nudging.gamma` names `nudging`, which its `alignment` does not set"),
        ({"configurations": [{"model": "base", "alignment": {"nudging": {}}, "grid": {"gamma": [0.2]}}]},
         "must be `<method>.<parameter>`"),
        ({"configurations": [{"model": "base", "alignment": {"nudging": {}}, "grid": {"nudging.gamma": []}}]},
         "has no values"),
        ({"configurations": [{"name": "base", "model": "base"}]}, "base appear more than once"),
        ({"configurations": [{"model": "base", "temperature": 0}]}, "temperature: Extra inputs are not permitted"),
    ],
)  # fmt: skip
def test_a_matrix_that_cannot_run_is_refused_naming_why(change: dict[str, Any], message: str):
    with pytest.raises(MatrixError, match=message.replace("[", r"\[")):
        parse_matrix({**BASELINES, **change})


def test_the_toy_suite_expands_into_configurations_the_server_accepts():
    matrix = load_matrix(Path(str(resources.files("evaluation").joinpath("suites/toy.yaml"))))
    settings = Settings.load()
    served = {m.name for m in settings.models} | {p.name for p in settings.profiles}
    configurations = matrix.expand()
    assert len(configurations) > len(matrix.configurations) and matrix.models() <= served
    for configuration in configurations:
        alignment = parse_alignment(configuration.alignment)  # every method's parameters validate
        assert set(alignment.methods) == set(configuration.alignment or {}), configuration.name


def test_the_methods_benchmark_asks_for_what_the_embedded_default_serves():
    served = {m.name for m in Settings.load().models} | {p.name for p in Settings.load().profiles}
    for variants in GROUPS.values():
        for configuration in variants:
            assert configuration.model in served
            assert set(parse_alignment(configuration.alignment).methods) == set(configuration.alignment or {})
