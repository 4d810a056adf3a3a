"""The alignment methods a request may name, each with its stage hook. Adding a method: one module, one line here."""

from __future__ import annotations

from decoding.best_of_n import BestOfNParams, BestOfNSelection
from decoding.early_rejection import EarlyRejectionParams, EarlyRejectionSelection
from decoding.genarm import GenArmParams, GenArmStrategy
from decoding.grammar import GrammarParams, GrammarStage
from decoding.guidelines import GuidelinesParams, GuidelinesStage
from decoding.nudging import NudgingParams, NudgingStrategy
from decoding.stages import MethodSpec
from decoding.transfer_q import TransferQParams, TransferQStrategy
from decoding.uncertainty import AbstainGate, AbstainParams, UncertaintyGate, UncertaintyParams

METHODS: dict[str, MethodSpec] = {
    "guidelines": MethodSpec(GuidelinesParams, prompt=GuidelinesStage()),
    "nudging": MethodSpec(NudgingParams, strategy=NudgingStrategy),
    "transfer_q": MethodSpec(TransferQParams, strategy=TransferQStrategy),
    "genarm": MethodSpec(GenArmParams, strategy=GenArmStrategy),
    "grammar": MethodSpec(GrammarParams, processor=GrammarStage()),
    "best_of_n": MethodSpec(BestOfNParams, selection=BestOfNSelection()),
    "early_rejection": MethodSpec(EarlyRejectionParams, selection=EarlyRejectionSelection()),
    "uncertainty": MethodSpec(UncertaintyParams, gate=UncertaintyGate()),
    "abstain": MethodSpec(AbstainParams, gate=AbstainGate()),
}
