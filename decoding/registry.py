"""The alignment methods a request may name, by stage. Adding a method: one module, one line here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from decoding.base import MethodParams, Resources, Strategy
from decoding.best_of_n import BestOfNParams
from decoding.grammar import GrammarParams
from decoding.guidelines import GuidelinesParams
from decoding.nudging import NudgingParams, NudgingStrategy
from decoding.transfer_q import TransferQParams, TransferQStrategy

Stage = Literal["prompt", "strategy", "selection", "processor"]
StrategyFactory = Callable[[Any, Resources, Any], Strategy]
"""(params, resources, limits) -> a strategy for one request."""


@dataclass(frozen=True, slots=True)
class MethodSpec:
    stage: Stage
    params: type[MethodParams]
    strategy: StrategyFactory | None = None


METHODS: dict[str, MethodSpec] = {
    "guidelines": MethodSpec("prompt", GuidelinesParams),
    "grammar": MethodSpec("processor", GrammarParams),
    "best_of_n": MethodSpec("selection", BestOfNParams),
    "nudging": MethodSpec("strategy", NudgingParams, NudgingStrategy),
    "transfer_q": MethodSpec("strategy", TransferQParams, TransferQStrategy),
}
