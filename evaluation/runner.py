"""Running tasks through a deployment's HTTP API, one configuration at a time, as its clients would.

A task (one line of a tasks JSONL) has ``messages`` (and ``prompt``, their plain-text rendering, for a
model without a chat template), a ``checker`` with its ``reference`` and options, a ``category`` and an
``id``. A ``Configuration`` names the model or profile, the route, the ``alignment`` object and the
sampling. Every request carries a seed derived from the task's id, so a rerun reproduces it.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from evaluation.checkers import check

if TYPE_CHECKING:
    import openai


@dataclass(frozen=True, slots=True)
class Configuration:
    """What to ask: ``model`` (a model or profile) on ``route``, with ``alignment`` and ``sampling``."""

    name: str
    model: str
    route: Literal["chat", "completions"] = "chat"
    alignment: Mapping[str, Any] | None = None
    sampling: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Outcome:
    """One task's answer under one configuration."""

    task: Mapping[str, Any]
    configuration: str
    text: str
    passed: bool
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    details: Mapping[str, Any] | None
    seconds: float


def task_seed(task: Mapping[str, Any], seed: int) -> int:
    """A seed per task and run: the same task gets the same samples in every configuration and rerun."""
    return int(hashlib.sha256(f"{seed}/{task['id']}".encode()).hexdigest()[:8], 16)


async def run_configuration(
    client: openai.AsyncOpenAI,
    tasks: Sequence[Mapping[str, Any]],
    configuration: Configuration,
    *,
    concurrency: int = 4,
    seed: int = 0,
) -> list[Outcome]:
    """Every task's outcome under ``configuration``, in task order, ``concurrency`` requests at a time."""
    gate = asyncio.Semaphore(concurrency)

    async def one(task: Mapping[str, Any]) -> Outcome:
        async with gate:
            return await ask(client, task, configuration, seed=task_seed(task, seed))

    return list(await asyncio.gather(*(one(task) for task in tasks)))


async def ask(
    client: openai.AsyncOpenAI, task: Mapping[str, Any], configuration: Configuration, *, seed: int
) -> Outcome:
    extra = {"alignment": {**(configuration.alignment or {}), "return_details": True}}
    sampling = {"seed": seed, **configuration.sampling}
    started = time.perf_counter()
    text: str
    if configuration.route == "chat":
        chat = await client.chat.completions.create(
            model=configuration.model, messages=task["messages"], extra_body=extra, **sampling
        )
        choice, usage = chat.choices[0], chat.usage
        text = choice.message.content or ""
    else:
        completion = await client.completions.create(
            model=configuration.model, prompt=task["prompt"], extra_body=extra, **sampling
        )
        choice, usage = completion.choices[0], completion.usage  # type: ignore[assignment]
        text = completion.choices[0].text
    seconds = time.perf_counter() - started
    return Outcome(
        task=task,
        configuration=configuration.name,
        text=text,
        passed=check(task, text),
        finish_reason=str(choice.finish_reason),
        prompt_tokens=usage.prompt_tokens if usage else 0,
        completion_tokens=usage.completion_tokens if usage else 0,
        details=(choice.model_extra or {}).get("alignment"),
        seconds=seconds,
    )


def pass_rate(outcomes: Sequence[Outcome]) -> float:
    return sum(outcome.passed for outcome in outcomes) / len(outcomes) if outcomes else 0.0
