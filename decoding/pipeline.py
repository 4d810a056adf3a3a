"""The decoding pipeline: prompt stage -> generation strategy (engine processors inside) -> selection stage.

The pipeline folds over the stage hooks of the request's methods (``decoding.stages``):

1. prompt: each prompt-stage method rewrites the prompt (guidelines), once per request;
2. strategy: the request's strategy (plain unless a method registers another) renders the
   base prompt; processor-stage methods (grammar) constrain the generating engine;
3. selection: a selection-stage method (best-of-N) draws its candidates from the strategy
   and returns the top ``n``; without one the strategy draws ``n``;
4. gate: before the strategy runs, gate-stage methods (uncertainty, abstain) judge the base's
   greedy answer, measured once; an abstention answers every choice without generating, or
   the request's fallback (another profile, prepared with it and sharing its meter) answers.

``run`` and ``stream`` share every step: a stream is the incremental view of ``run``'s
result (token by token for plain generation without selection, else each choice whole),
ending each choice with the same candidate, finish reason and details. Every engine call
is metered, so ``usage`` counts all tokens the request cost.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import BaseModel

from decoding.alignment import Alignment
from decoding.base import (
    Candidate,
    Generation,
    GenerationJob,
    Limits,
    MethodParams,
    PromptInput,
    Resources,
    Strategy,
    prompt_token_ids,
)
from decoding.events import ChoiceFinished, StreamEvent, TextDelta
from decoding.plain import PlainStrategy
from decoding.stages import EngineConstraint, MethodSpec, Services
from decoding.tracing import stage_span
from decoding.uncertainty import greedy_answer
from decoding.usage import MeteredEngine, MeteredResources, UsageMeter
from models.engine import Engine, SamplingParams, TokenLogprob
from models.errors import ContextLengthExceededError, InvalidRequestError, WorkBudgetExceededError


@dataclass(slots=True)
class AlignedRequest:
    """What the server hands over: a resolved base engine, the client's prompt and sampling, the alignment."""

    engine: Engine
    prompt: PromptInput
    sampling: SamplingParams
    alignment: Alignment
    requested_max_tokens: int | None = None
    budget_param: str = "max_tokens"
    fallback: AlignedRequest | None = None
    """The request as ``abstain``'s fallback profile runs it, where it names one."""
    resources: Resources | None = None
    """The models and scorers its methods may use where not every one (an API key's); None: the pipeline's."""


@dataclass(frozen=True, slots=True)
class Prepared:
    """A request after validation, the prompt stage and tokenisation: ready to generate."""

    request: AlignedRequest
    job: GenerationJob
    strategy: Strategy
    constraints: tuple[EngineConstraint, ...]
    resources: MeteredResources
    prompt_details: dict[str, BaseModel]
    samples: int
    """Candidates the strategy draws: the selection stage's, else ``n``."""
    extra_samples: int = 0
    """Samples of the base besides the strategy's: calibration references, a gate's greedy answer."""
    fallback: Prepared | None = None
    """What answers when a gate abstains, prepared (and so checked) with the request; it shares its meter."""
    strategy_work: int = 0
    """The strategy's own work per answer (``Strategy.work``)."""

    @property
    def meter(self) -> UsageMeter:
        return self.resources.meter

    @property
    def sampling_work(self) -> int:
        """Samples x max_tokens x models (generating engines and scorers)."""
        return (self.samples + self.extra_samples) * self.job.sampling.max_tokens * len(self.meter.models)

    @property
    def work(self) -> int:
        """The compute the request asked for: its sampling work, plus the strategy's own for every answer."""
        return self.sampling_work + self.samples * self.strategy_work

    @property
    def plain_stream(self) -> bool:
        """Text can stream as it is made: plain generation, nothing selected afterwards."""
        return isinstance(self.strategy, PlainStrategy) and self.selection is None

    @property
    def selection(self) -> tuple[MethodParams, MethodSpec] | None:
        selected = self.request.alignment.at("selection")
        return (selected[0][1], selected[0][2]) if selected else None


@dataclass(slots=True)
class Verdict:
    """What the gate stage decided: an abstention (every choice answers with it), the greedy answer that
    already is the response, and the gates' details for every choice."""

    abstention: str | None = None
    greedy: Candidate | None = None
    details: dict[str, BaseModel] = field(default_factory=dict)


@dataclass(slots=True)
class PipelineResult:
    prompt_ids: list[int]
    choices: list[Candidate]
    meter: UsageMeter
    prompt_logprobs: list[TokenLogprob | None] | None = None


class Pipeline:
    """Runs aligned requests. Built once per server with its resources injected.

    Args:
        resources: engines and scorers by name.
        limits: server bounds on what a request may ask.
        services: server-wide state the methods' hooks use (guideline libraries, the grammar store).
    """

    def __init__(self, resources: Resources, limits: Limits, services: Services) -> None:
        self.resources = resources
        self.limits = limits
        self.services = services

    async def prepare(self, request: AlignedRequest, meter: UsageMeter | None = None) -> Prepared:
        """Every check that can refuse the request runs here, before any generation (and before a stream's 200).
        ``meter``: the usage meter to count into (a fallback counts into its request's)."""
        with stage_span("prepare", "+".join(request.alignment.methods) or "plain"):
            return await self._prepare(request, meter)

    async def _prepare(self, request: AlignedRequest, meter: UsageMeter | None) -> Prepared:
        alignment = request.alignment
        meter = UsageMeter() if meter is None else meter
        meter.models.add(request.engine.info.name)
        resources = MeteredResources(request.resources or self.resources, meter)
        fallback = await self.prepare(request.fallback, meter) if request.fallback is not None else None
        samples, extra_samples = request.sampling.n, 0
        for _, params, spec in alignment.at("selection"):
            assert spec.selection is not None
            spec.selection.check(params, request.sampling, resources, self.limits)
            samples, extra_samples = spec.selection.samples(params), spec.selection.base_samples(params)
        prompt, prompt_details = request.prompt, {}
        for name, params, spec in alignment.at("prompt"):
            assert spec.prompt is not None
            prompt, prompt_details[name] = spec.prompt.rewrite(params, prompt, self.services)
        strategy = self._strategy(alignment, resources)
        engine = MeteredEngine(request.engine, resources.meter)
        rendered = strategy.render(engine, prompt)
        prompt_ids = prompt_token_ids(engine, prompt, rendered)
        sampling = replace(request.sampling, max_tokens=self._max_tokens(engine, len(prompt_ids), request))
        job = GenerationJob(engine, prompt, rendered, prompt_ids, sampling)
        constraints = self._constraints(alignment, job)
        for constraint in constraints:
            sampling = constraint.apply(sampling)
        job = replace(job, sampling=sampling)
        strategy.check(job)
        gates = alignment.at("gate")
        for _, params, spec in gates:
            assert spec.gate is not None
            spec.gate.check(params, job)
        extra_samples += 1 if gates else 0
        self._check_own_draws(alignment, samples, constraints)
        prepared = Prepared(request, job, strategy, constraints, resources, prompt_details, samples, extra_samples,
                            fallback, strategy.work(job))  # fmt: skip
        self._check_work(prepared)
        return prepared

    async def run(self, prepared: Prepared) -> PipelineResult:
        verdict = await self._judge(prepared)
        if verdict.abstention is not None and prepared.fallback is not None:
            result = await self.run(prepared.fallback)
            for candidate in result.choices:
                candidate.details = {**verdict.details, **candidate.details}
            return result
        return await self._run(prepared, verdict)

    async def stream(self, prepared: Prepared) -> AsyncGenerator[StreamEvent, None]:
        verdict = await self._judge(prepared)
        if verdict.abstention is not None and prepared.fallback is not None:
            async with aclosing(self.stream(prepared.fallback)) as events:
                async for event in events:
                    if isinstance(event, ChoiceFinished):
                        event.candidate.details = {**verdict.details, **event.candidate.details}
                    yield event
            return
        if prepared.plain_stream and verdict.abstention is None and verdict.greedy is None:
            assert isinstance(prepared.strategy, PlainStrategy)
            # Text streams as it is made; the choices end together, once every sample has: their details
            # (a trie's size, say) then describe the request as a whole, exactly as ``run``'s do.
            finished: list[ChoiceFinished] = []
            async with aclosing(prepared.strategy.stream(prepared.job)) as events:
                async for event in events:
                    if isinstance(event, ChoiceFinished):
                        finished.append(event)
                    else:
                        yield event
            for event in sorted(finished, key=lambda event: event.index):
                yield ChoiceFinished(event.index, self._finish(prepared, event.candidate, verdict))
            return
        # Nothing can be shown before the strategy (and the selection) are done: each choice arrives whole.
        result = await self._run(prepared, verdict)
        for index, candidate in enumerate(result.choices):
            yield TextDelta(index, candidate.text, candidate.logprobs)
            yield ChoiceFinished(index, candidate)

    async def _run(self, prepared: Prepared, verdict: Verdict) -> PipelineResult:
        job = prepared.job
        if verdict.abstention is not None:
            choices = [self._abstention(prepared, verdict) for _ in range(job.sampling.n)]
            return PipelineResult(job.prompt_ids, choices, prepared.meter)
        if verdict.greedy is not None:
            return PipelineResult(job.prompt_ids, [self._finish(prepared, verdict.greedy, verdict)], prepared.meter)
        generation = Generation([])
        alignment = prepared.request.alignment
        if prepared.samples:  # else the selection stage draws its own candidates (early rejection)
            with stage_span("strategy", next((name for name, _, _ in alignment.at("strategy")), "plain")):
                generation = await prepared.strategy.generate(job, prepared.samples)
        candidates = [self._finish(prepared, candidate, verdict) for candidate in generation.candidates]
        for name, params, spec in alignment.at("selection"):
            assert spec.selection is not None
            with stage_span("selection", name):
                candidates = await spec.selection.select(params, candidates, job, prepared.resources)
        return PipelineResult(job.prompt_ids, candidates, prepared.meter, generation.prompt_logprobs)

    async def _judge(self, prepared: Prepared) -> Verdict:
        """The gate stage: the base's greedy answer measured once, each gate's verdict on it. A plain, greedy
        request of one choice (no prompt logprobs) is answered by that greedy answer itself."""
        gates = prepared.request.alignment.at("gate")
        if not gates:
            return Verdict()
        with stage_span("gate", "+".join(name for name, _, _ in gates)):
            greedy, uncertainty = await greedy_answer(prepared.job)
        verdict = Verdict()
        for name, params, spec in gates:
            assert spec.gate is not None
            abstention, verdict.details[name] = spec.gate.verdict(params, uncertainty)
            verdict.abstention = verdict.abstention or abstention
        sampling = prepared.job.sampling
        if (
            prepared.plain_stream and sampling.temperature == 0 and sampling.n == 1
            and sampling.prompt_logprobs is None and sampling.logprobs != 0
        ):  # fmt: skip
            greedy.logprobs = greedy.logprobs if sampling.logprobs is not None else None
            verdict.greedy = greedy
        return verdict

    def _abstention(self, prepared: Prepared, verdict: Verdict) -> Candidate:
        """A choice that answers with the abstention: the prompt stage's and the gates' details only."""
        assert verdict.abstention is not None
        ids = prepared.job.engine.tokenizer.encode(verdict.abstention, add_special_tokens=False)
        candidate = Candidate(verdict.abstention, ids, "stop")
        candidate.details = {**prepared.prompt_details, **verdict.details}
        return candidate

    def _finish(self, prepared: Prepared, candidate: Candidate, verdict: Verdict) -> Candidate:
        """A finished candidate as the methods see it: reviewed by the engine constraints, with the prompt
        stage's and the gates' details first."""
        for constraint in prepared.constraints:
            constraint.review(candidate)
        candidate.details = {**prepared.prompt_details, **verdict.details, **candidate.details}
        return candidate

    def _strategy(self, alignment: Alignment, resources: MeteredResources) -> Strategy:
        """The request's generation strategy; its models are resolved (and metered) now."""
        chosen = alignment.at("strategy")
        if not chosen:
            return PlainStrategy()
        _, params, spec = chosen[0]
        assert spec.strategy is not None
        return spec.strategy(params, resources, self.limits)

    def _constraints(self, alignment: Alignment, job: GenerationJob) -> tuple[EngineConstraint, ...]:
        """Processor-stage methods run inside the generating engine; only the plain strategy has just one."""
        processors = alignment.at("processor")
        strategy = alignment.at("strategy")
        if processors and strategy:
            method, other = processors[0][0], strategy[0][0]
            raise InvalidRequestError(
                f"`{method}` cannot be combined with `{other}`: alignd constrains the generating engine only, "
                f"not every model {other} uses.",
                param=f"alignment.{method}",
            )
        constraints = []
        for _, params, spec in processors:
            assert spec.processor is not None
            constraints.append(spec.processor.constrain(params, job, self.services))
        return tuple(constraints)

    @staticmethod
    def _check_own_draws(alignment: Alignment, samples: int, constraints: tuple[EngineConstraint, ...]) -> None:
        """A selection method that draws its own samples from the base continues them from their token ids:
        there is no other strategy to draw from, and a grammar's state would restart with each continuation."""
        selection = alignment.at("selection")
        if samples or not selection:
            return
        other = [name for name, _, _ in alignment.at("strategy")] + (["grammar"] if constraints else [])
        if other:
            method = selection[0][0]
            raise InvalidRequestError(
                f"`{method}` generates the base's own candidates in rounds; it cannot be combined with `{other[0]}`.",
                param=f"alignment.{method}",
            )

    def _check_work(self, prepared: Prepared) -> None:
        """Refuses, before any generation, a request that asks for more compute than the server allows."""
        limit = self.limits.max_request_work
        if prepared.work <= limit:
            return
        name = prepared.request.budget_param
        samples = prepared.samples + prepared.extra_samples
        guided = ""
        if prepared.strategy_work:
            guided = f" + {prepared.samples} answers x {prepared.strategy_work} of token-guided decoding"
        raise WorkBudgetExceededError(
            f"This request asks for {samples} samples x {prepared.job.sampling.max_tokens} tokens x "
            f"{len(prepared.meter.models)} models{guided} = {prepared.work}, above the server's budget of {limit} "
            f"per request. Lower `{name}`, `n`, `alignment.best_of_n.n` or its calibration references.",
            param=name,
        )

    def _max_tokens(self, engine: Engine, prompt_tokens: int, request: AlignedRequest) -> int:
        """The token budget, checked against the context: the request's, else what is left (capped)."""
        context = engine.info.max_model_len
        prompt_param = "messages" if request.prompt.messages is not None else "prompt"
        if prompt_tokens >= context:
            raise ContextLengthExceededError(
                f"This model's maximum context length is {context} tokens, but the prompt has {prompt_tokens} tokens.",
                param=prompt_param,
            )
        requested = request.requested_max_tokens
        if requested is None:
            return min(self.limits.default_max_tokens, context - prompt_tokens)
        if prompt_tokens + requested > context:
            name = request.budget_param
            raise ContextLengthExceededError(
                f"This model's maximum context length is {context} tokens; the prompt has {prompt_tokens} "
                f"tokens and `{name}` asks for {requested}. Lower `{name}` to at most {context - prompt_tokens}.",
                param=name,
            )
        return requested


def details_json(candidate: Candidate) -> dict[str, Any]:
    return {name: record.model_dump(by_alias=True) for name, record in candidate.details.items()}
