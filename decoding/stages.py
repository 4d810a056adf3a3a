"""The stage hooks a method registers, and the server-wide services hooks may use.

The pipeline runs its stages in a fixed order and folds over the methods of
each (see ``decoding.pipeline``):

1. **prompt** — ``PromptStage.rewrite``: the prompt (and the details of what changed);
2. **strategy** — a ``StrategyFactory`` builds the request's ``Strategy`` (exactly one; plain by default);
3. **processor** — ``ProcessorStage.constrain``: an ``EngineConstraint`` that runs inside the generating
   engine and reviews every finished candidate;
4. **selection** — ``SelectionStage``: how many candidates to draw, and which to return;
5. **gate** — ``GateStage``: before any of the strategy's work, a verdict on the base's greedy answer
   and its uncertainty (measured once per request, by one greedy call): answer, or abstain.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

from pydantic import BaseModel

from decoding.base import Candidate, GenerationJob, Limits, MethodParams, PromptInput, Resources, Strategy
from models.engine import SamplingParams

T = TypeVar("T")
Stage = Literal["prompt", "strategy", "processor", "selection", "gate"]


class Services:
    """Server-wide state some hooks need (the guideline libraries, the ASAp trie store), by type."""

    def __init__(self, *services: object) -> None:
        self._by_type = {type(service): service for service in services}

    def get(self, kind: type[T]) -> T:
        service = self._by_type.get(kind)
        if service is None:
            raise LookupError(f"the pipeline was built without a {kind.__name__}")
        assert isinstance(service, kind)
        return service


class PromptStage(Protocol):
    def rewrite(self, params: Any, prompt: PromptInput, services: Services) -> tuple[PromptInput, BaseModel]:
        """The rewritten prompt and the details of what was done."""
        ...


StrategyFactory = Callable[[Any, Resources, Limits], Strategy]
"""(params, resources, limits) -> the strategy for one request; resolves (and so meters) its models."""


class EngineConstraint(Protocol):
    """A per-request constraint inside the generating engine (e.g. a grammar)."""

    def apply(self, sampling: SamplingParams) -> SamplingParams:
        """The sampling settings that run it in the engine (logits processors or worker arguments)."""
        ...

    def review(self, candidate: Candidate) -> None:
        """Records its details on a finished candidate and corrects its finish reason."""
        ...


class ProcessorStage(Protocol):
    def constrain(self, params: Any, job: GenerationJob, services: Services) -> EngineConstraint: ...


class SelectionStage(Protocol):
    def check(self, params: Any, sampling: SamplingParams, resources: Resources, limits: Limits) -> None:
        """Refuses, before any work, what cannot be selected (bounds, unknown scorers)."""
        ...

    def samples(self, params: Any) -> int:
        """How many candidates the strategy draws."""
        ...

    def base_samples(self, params: Any) -> int:
        """How many more samples it draws from the base itself (calibration references): counted as work."""
        ...

    async def select(
        self, params: Any, candidates: list[Candidate], job: GenerationJob, resources: Resources
    ) -> list[Candidate]:
        """The ``job.sampling.n`` candidates returned, in selection order, each with its details."""
        ...


class GateStage(Protocol):
    def check(self, params: Any, job: GenerationJob) -> None:
        """Refuses, before any work, what the gate cannot measure (a model without logprobs, say)."""
        ...

    def verdict(self, params: Any, uncertainty: Any) -> tuple[str | None, BaseModel]:
        """The abstention to answer with (None: generate as asked), and the details of the decision."""
        ...


@dataclass(frozen=True, slots=True)
class MethodSpec:
    """A method in the registry: its parameters and its one stage hook."""

    params: type[MethodParams]
    prompt: PromptStage | None = None
    strategy: StrategyFactory | None = None
    processor: ProcessorStage | None = None
    selection: SelectionStage | None = None
    gate: GateStage | None = None

    def __post_init__(self) -> None:
        hooks = [self.prompt, self.strategy, self.processor, self.selection, self.gate]
        if sum(hook is not None for hook in hooks) != 1:
            raise ValueError(f"{self.params.__name__}: a method registers exactly one stage hook")

    @property
    def stage(self) -> Stage:
        if self.prompt is not None:
            return "prompt"
        if self.strategy is not None:
            return "strategy"
        if self.processor is not None:
            return "processor"
        return "selection" if self.selection is not None else "gate"
