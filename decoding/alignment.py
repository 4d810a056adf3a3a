"""The ``alignment`` request extension: typed from the registry, merged over a profile, validated per method.

Two validations, one schema:

- at the request edge, ``AlignmentPatch`` (a field per registered method) checks types, bounds and
  unknown names; a method's required fields may be missing there, since a profile may supply them
  (its JSON schema still lists them as required: that is what a request to a plain model needs);
- after the request's object is merged over its profile's, ``parse_alignment`` validates each method
  with its own ``...Params`` model, cross-field checks included.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    PrivateAttr,
    StrictBool,
    ValidationError,
    create_model,
    model_validator,
)
from pydantic_core import PydanticUndefined

from decoding.base import MethodParams
from decoding.registry import METHODS
from decoding.stages import MethodSpec, Stage
from models.errors import InvalidRequestError, from_validation_errors

OPTIONS = ("return_details",)


@dataclass(frozen=True, slots=True)
class Alignment:
    """A request's methods, each validated by its own parameter model, in the order the request names them."""

    methods: dict[str, MethodParams] = field(default_factory=dict)
    return_details: bool = False

    def at(self, stage: Stage) -> list[tuple[str, MethodParams, MethodSpec]]:
        """The request's methods of one stage: (name, params, spec)."""
        return [(name, params, METHODS[name]) for name, params in self.methods.items() if METHODS[name].stage == stage]


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
    unknown = [name for name in merged if name not in METHODS and name not in OPTIONS]
    if unknown:
        available = ", ".join(sorted(METHODS))
        raise InvalidRequestError(
            f"`{unknown[0]}` is not an alignment method (available: {available}).", param=f"alignment.{unknown[0]}"
        )
    methods: dict[str, MethodParams] = {}
    for name, value in merged.items():
        if name in OPTIONS or value is None:
            continue
        try:
            methods[name] = METHODS[name].params.model_validate(value)
        except ValidationError as exc:
            raise from_validation_errors(exc.errors(), prefix=f"alignment.{name}") from exc
    for stage, what in (("strategy", "generation strategy"), ("selection", "selection method")):
        chosen = [name for name in methods if METHODS[name].stage == stage]
        if len(chosen) > 1:
            raise InvalidRequestError(
                f"Choose one {what}; `{chosen[0]}` and `{chosen[1]}` cannot be combined.",
                param=f"alignment.{chosen[1]}",
            )
    details = merged.get("return_details", False)
    if not isinstance(details, bool):
        raise InvalidRequestError("`return_details` must be a boolean.", param="alignment.return_details")
    return Alignment(methods=methods, return_details=details)


def _patch_model(params: type[MethodParams]) -> type[BaseModel]:
    """``params`` with every field optional (its bounds and field validators kept, cross-field checks left to
    the merged object); its JSON schema shows the real defaults and required fields."""
    fields: dict[str, Any] = {}
    for name, info in params.model_fields.items():
        annotation = Annotated[info.annotation, *info.metadata] if info.metadata else info.annotation
        documented = {} if info.default is PydanticUndefined else {"default": info.default}
        fields[name] = (annotation, Field(None, alias=info.alias, description=info.description,
                                          json_schema_extra=documented))  # fmt: skip
    required = [info.alias or name for name, info in params.model_fields.items() if info.is_required()]
    namespace = {name: (lambda self: self) for name in params.__pydantic_decorators__.model_validators}

    def document(schema: dict[str, Any]) -> None:
        schema.pop("required", None)
        if required:
            schema["required"] = required
        for name, prop in schema.get("properties", {}).items():
            if name in required:
                prop.pop("default", None)

    patch = create_model(params.__name__, __base__=params, __module__=params.__module__, **fields)
    return type(params.__name__, (patch,), {**namespace, "model_config": ConfigDict(json_schema_extra=document),
                                            "__doc__": params.__doc__})  # fmt: skip


class _AlignmentBase(BaseModel):
    """Keeps the order in which the request named its methods (it decides which of two strategies an error names)."""

    model_config = ConfigDict(extra="forbid")
    _order: list[str] = PrivateAttr(default_factory=list)

    @model_validator(mode="wrap")
    @classmethod
    def _remember_order(cls, data: Any, handler: ModelWrapValidatorHandler[_AlignmentBase]) -> _AlignmentBase:
        patch = handler(data)
        if isinstance(data, Mapping):
            patch._order = list(data)
        return patch

    def as_sent(self) -> dict[str, Any]:
        """The fields the client set, in its order, as the methods' models read them."""
        fields = self.model_dump(exclude_unset=True, by_alias=True)
        return {name: fields[name] for name in sorted(fields, key=lambda name: self._order.index(name))}


_FIELDS: dict[str, Any] = {name: (_patch_model(spec.params) | None, None) for name, spec in METHODS.items()}
_FIELDS["return_details"] = (
    StrictBool,
    Field(False, description="Return what each method did as `choices[i].alignment`."),
)
AlignmentPatch: type[_AlignmentBase] = create_model(
    "Alignment",
    __base__=_AlignmentBase,
    __doc__="alignd's extension: the alignment methods of this request (over its profile's, field by field).",
    **_FIELDS,
)
