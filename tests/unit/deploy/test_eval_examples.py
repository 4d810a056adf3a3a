"""The example evaluations for real models (deploy/eval/): each matrix parses, names only what the example
GPU configuration serves, and is valid against that configuration's methods and profiles."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from decoding.alignment import parse_alignment
from evaluation.matrix import load_matrix
from evaluation.tasks import load_tasks
from server.config import Settings

EXAMPLES = Path(__file__).parents[3] / "deploy" / "eval"
MATRICES = sorted(path for path in EXAMPLES.glob("*.yaml") if not path.name.endswith(".example.yaml"))


def served() -> Settings:
    return Settings.model_validate(yaml.safe_load((EXAMPLES / "gpu-models.example.yaml").read_text()))


@pytest.mark.parametrize("path", MATRICES, ids=lambda path: path.stem)
def test_each_example_matrix_runs_on_the_example_models(path: Path):
    matrix = load_matrix(path)
    settings = served()
    names = {m.name for m in settings.models}
    assert matrix.models() <= names
    assert set(matrix.reward.scorers) <= {s.name for s in settings.scorers}
    for configuration in matrix.expand():
        parse_alignment(dict(configuration.alignment) if configuration.alignment else None)


def test_the_json_tasks_load():
    assert len(load_tasks(EXAMPLES / "json-tasks.jsonl").tasks) == 20
    assert len(MATRICES) == 3
