"""Matrices: which configurations to evaluate, with grids over their parameters (YAML).

```yaml
name: toy                        # names the output folder
seed: 0                          # every request's seed derives from it and the task's id
sampling: {max_tokens: 40}       # defaults under every configuration's own sampling
reward:
  scorers: [toy-rm]              # every answer's reward, through POST /v1/rewards
  model: toy-base                # renders chats for the scorers; gives the base log-likelihood of answers
base:                            # the plain base model: required
  model: toy-base
  route: completions
aligned:                         # the plain aligned model: required
  model: toy-nudger
configurations:
  - name: nudging
    model: toy-base
    alignment: {nudging: {nudger: toy-nudger}}
    grid: {nudging.gamma: [0.2, 0.4, 0.6]}     # one configuration per value
    categories: [capital, unsafe]               # only these tasks (default: all)
```

A grid key is a dotted path into the configuration's ``alignment`` (``best_of_n.n``) or its ``sampling``
(``sampling.temperature``); several keys make their product. A grid point is named ``nudging[gamma=0.4]``.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from evaluation.runner import Configuration

BASE, ALIGNED = "base", "aligned"


class MatrixError(ValueError):
    """A matrix that cannot run, with the reason (before any request is sent)."""


class RewardSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    scorers: list[str] = Field(default_factory=list, description="Scorers every answer is rewarded by.")
    model: str = Field(description="The base model: renders chat prompts for the scorers, scores log-likelihoods.")


class ConfigurationSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, pattern=r"^[\w.-]+$")
    model: str = Field(description="A served model or profile.")
    route: Literal["chat", "completions"] = "chat"
    alignment: dict[str, Any] | None = None
    sampling: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    categories: list[str] | None = None

    @field_validator("grid")
    @classmethod
    def _non_empty(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for path, values in grid.items():
            if not values:
                raise ValueError(f"the grid `{path}` has no values")
        return grid


class Matrix(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="eval", pattern=r"^[\w.-]+$")
    seed: int = 0
    sampling: dict[str, Any] = Field(default_factory=dict)
    reward: RewardSpec
    base: ConfigurationSpec
    aligned: ConfigurationSpec
    configurations: list[ConfigurationSpec] = Field(default_factory=list)

    def expand(self) -> list[Configuration]:
        """The baselines, then every grid point of every configuration; names are unique."""
        expanded = [
            *_grid_points(self.base, BASE, self.sampling, role=BASE),
            *_grid_points(self.aligned, ALIGNED, self.sampling, role=ALIGNED),
        ]
        for index, spec in enumerate(self.configurations):
            expanded += _grid_points(spec, spec.name or f"configuration-{index}", self.sampling, role=None)
        names = [configuration.name for configuration in expanded]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise MatrixError(f"configuration names must be unique: {', '.join(repeated)} appear more than once")
        return expanded

    def models(self) -> set[str]:
        return {self.reward.model, self.base.model, self.aligned.model, *(c.model for c in self.configurations)}


def load_matrix(path: Path) -> Matrix:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise MatrixError(f"{path}: {exc}") from exc
    return parse_matrix(data, source=str(path))


def parse_matrix(data: Any, *, source: str = "matrix") -> Matrix:
    try:
        matrix = Matrix.model_validate(data)
        matrix.expand()
    except ValidationError as exc:
        reasons = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise MatrixError(f"{source}: {reasons}") from exc
    except MatrixError as exc:
        raise MatrixError(f"{source}: {exc}") from exc
    return matrix


def _grid_points(
    spec: ConfigurationSpec, method: str, defaults: Mapping[str, Any], *, role: str | None
) -> list[Configuration]:
    paths = list(spec.grid)
    points = itertools.product(*(spec.grid[path] for path in paths)) if paths else [()]
    configurations = []
    for values in points:
        alignment = copy.deepcopy(spec.alignment) if spec.alignment is not None else None
        sampling = {**defaults, **spec.sampling}
        for path, value in zip(paths, values, strict=True):
            alignment = _set(alignment, sampling, path, value, method)
        label = ",".join(f"{path.rsplit('.', 1)[-1]}={value}" for path, value in zip(paths, values, strict=True))
        configurations.append(
            Configuration(
                name=f"{method}[{label}]" if label else method,
                model=spec.model,
                route=spec.route,
                alignment=alignment,
                sampling=sampling,
                method=method,
                grid=dict(zip(paths, values, strict=True)),
                categories=tuple(spec.categories) if spec.categories is not None else None,
                role=role,
            )
        )
    return configurations


def _set(
    alignment: dict[str, Any] | None, sampling: dict[str, Any], path: str, value: Any, method: str
) -> dict[str, Any] | None:
    head, _, rest = path.partition(".")
    if not rest:
        raise MatrixError(f"`{method}`: the grid key `{path}` must be `<method>.<parameter>` or `sampling.<field>`")
    if head == "sampling":
        sampling[rest] = value
        return alignment
    if alignment is None or head not in alignment:
        raise MatrixError(f"`{method}`: the grid key `{path}` names `{head}`, which its `alignment` does not set")
    node = alignment[head]
    *parents, leaf = rest.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    return alignment
