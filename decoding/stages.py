"""The stage hooks a method registers, and the server-wide services hooks may use.

The pipeline runs its stages in a fixed order and folds over the methods of
each (see ``decoding.pipeline``):

1. **prompt** — ``PromptStage.rewrite``: the prompt (and the details of what changed);
2. **strategy** — a ``StrategyFactory`` builds the request's ``Strategy`` (exactly one; plain by default);
3. **processor** — ``ProcessorStage.constrain``: an ``EngineConstraint`` that runs inside the generating
   engine and reviews every finished candidate;
4. **selection** — ``SelectionStage``: how many candidates to draw, and which to return.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

from pydantic import BaseModel

from decoding.base import Candidate, GenerationJob, Limits, MethodParams, PromptInput, Resources, Strategy
from models.engine import SamplingParams

T = TypeVar("T")
Stage = Literal["prompt", "strategy", "processor", "selection"]


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

    async def select(
        self, params: Any, candidates: list[Candidate], job: GenerationJob, resources: Resources
    ) -> list[Candidate]:
        """The ``job.sampling.n`` candidates returned, in selection order, each with its details."""
        ...


@dataclass(frozen=True, slots=True)
class MethodSpec:
    """A method in the registry: its parameters and its one stage hook."""

    params: type[MethodParams]
    prompt: PromptStage | None = None
    strategy: StrategyFactory | None = None
    processor: ProcessorStage | None = None
    selection: SelectionStage | None = None

    def __post_init__(self) -> None:
        hooks = [self.prompt, self.strategy, self.processor, self.selection]
        if sum(hook is not None for hook in hooks) != 1:
            raise ValueError(f"{self.params.__name__}: a method registers exactly one stage hook")

    @property
    def stage(self) -> Stage:
        if self.prompt is not None:
            return "prompt"
        if self.strategy is not None:
            return "strategy"
        return "processor" if self.processor is not None else "selection"
