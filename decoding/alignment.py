"""The ``alignment`` request extension: parsed, merged over a profile, validated per method."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from decoding.base import MethodParams
from decoding.best_of_n import BestOfNParams
from decoding.grammar import GrammarParams
from decoding.guidelines import GuidelinesParams
from decoding.registry import METHODS
from models.errors import InvalidRequestError

OPTIONS = ("return_details",)


@dataclass(frozen=True, slots=True)
class Alignment:
    """A request's methods, each validated by its own parameter model."""

    methods: dict[str, MethodParams] = field(default_factory=dict)
    return_details: bool = False

    @property
    def guidelines(self) -> GuidelinesParams | None:
        return self._typed("guidelines", GuidelinesParams)

    @property
    def grammar(self) -> GrammarParams | None:
        return self._typed("grammar", GrammarParams)

    @property
    def best_of_n(self) -> BestOfNParams | None:
        return self._typed("best_of_n", BestOfNParams)

    def _typed(self, name: str, kind: type[MethodParams]) -> Any:
        params = self.methods.get(name)
        assert params is None or isinstance(params, kind)
        return params

    def strategy(self) -> tuple[str, MethodParams] | None:
        chosen = [(name, p) for name, p in self.methods.items() if METHODS[name].stage == "strategy"]
        return chosen[0] if chosen else None


def merge(profile: Mapping[str, Any] | None, request: Mapping[str, Any] | None) -> dict[str, Any]:
    """The request's alignment over the profile's, field by field (nested objects merge too)."""
    merged: dict[str, Any] = dict(profile or {})
    for key, value in (request or {}).items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_alignment(raw: Mapping[str, Any] | None, profile: Mapping[str, Any] | None = None) -> Alignment:
    """Validates an ``alignment`` object; every problem is a 400 naming ``alignment.<method>.<field>``."""
    merged = merge(profile, raw)
    methods: dict[str, MethodParams] = {}
    for name, value in merged.items():
        if name in OPTIONS:
            continue
        if name not in METHODS:
            available = ", ".join(sorted(METHODS))
            raise InvalidRequestError(
                f"`{name}` is not an alignment method (available: {available}).", param=f"alignment.{name}"
            )
        if value is None:
            continue
        try:
            methods[name] = METHODS[name].params.model_validate(value)
        except ValidationError as exc:
            raise _named(exc, f"alignment.{name}") from exc
    strategies = [name for name in methods if METHODS[name].stage == "strategy"]
    if len(strategies) > 1:
        raise InvalidRequestError(
            f"Choose one generation strategy; `{strategies[0]}` and `{strategies[1]}` cannot be combined.",
            param=f"alignment.{strategies[1]}",
        )
    details = merged.get("return_details", False)
    if not isinstance(details, bool):
        raise InvalidRequestError("`return_details` must be a boolean.", param="alignment.return_details")
    return Alignment(methods=methods, return_details=details)


def _named(exc: ValidationError, prefix: str) -> InvalidRequestError:
    error = exc.errors()[0]
    location = ".".join(str(part) for part in error["loc"])
    param = f"{prefix}.{location}" if location else prefix
    if error["type"] == "extra_forbidden":
        return InvalidRequestError(f"`{param}` is not a recognised parameter.", param=param)
    if error["type"] == "missing":
        return InvalidRequestError(f"`{param}` is required.", param=param)
    return InvalidRequestError(f"`{param}`: {error['msg']}", param=param)
