"""Running tasks through a deployment's HTTP API, one configuration at a time, as its clients would.

A task (one line of a tasks JSONL, see ``evaluation.tasks``) is sent as ``messages`` on the chat route or
as ``prompt`` on the completions route. A ``Configuration`` names the model or profile, the route, the
``alignment`` object and the sampling. Every request carries a seed derived from the task's id, so a rerun
reproduces it. With a ``RewardSpec``-like target, every answer is also rewarded through ``POST /v1/rewards``
(the server's scorers, and the base model's log-likelihood of the answer).
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from evaluation.checkers import check

if TYPE_CHECKING:
    import openai


@dataclass(frozen=True, slots=True)
class Configuration:
    """What to ask: ``model`` (a model or profile) on ``route``, with ``alignment`` and ``sampling``.

    ``method`` and ``grid`` place it on its method's curve (a matrix entry and its grid point); ``categories``
    restricts it to those tasks; ``role`` marks the baselines (``base``, ``aligned``).
    """

    name: str
    model: str
    route: Literal["chat", "completions"] = "chat"
    alignment: Mapping[str, Any] | None = None
    sampling: Mapping[str, Any] = field(default_factory=dict)
    method: str = ""
    grid: Mapping[str, Any] = field(default_factory=dict)
    categories: tuple[str, ...] | None = None
    role: str | None = None

    def applies_to(self, task: Mapping[str, Any]) -> bool:
        """Whether the task's category matches one of ``categories`` (shell patterns: ``rule-*``)."""
        category = str(task.get("category"))
        return self.categories is None or any(fnmatch.fnmatchcase(category, c) for c in self.categories)

    @property
    def fingerprint(self) -> str:
        """Identifies what the configuration sends: results of an edited configuration are not reused."""
        sent = {"model": self.model, "route": self.route, "alignment": self.alignment, "sampling": self.sampling}
        return hashlib.sha256(json.dumps(sent, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class RewardTarget:
    """How answers are rewarded: the scorers, and the model that renders chats and gives log-likelihoods."""

    scorers: tuple[str, ...]
    model: str


@dataclass(frozen=True, slots=True)
class Outcome:
    """One task's answer under one configuration (``error``: the server refused this one request)."""

    task: Mapping[str, Any]
    configuration: str
    text: str
    passed: bool | None
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    details: Mapping[str, Any] | None
    seconds: float
    engine_calls: int | None = None
    rewards: Mapping[str, float] = field(default_factory=dict)
    loglikelihood: float | None = None
    response_tokens: int | None = None
    error: str | None = None

    def record(self, fingerprint: str) -> dict[str, Any]:
        """The outcome as one line of a results file (the task by its id)."""
        data = asdict(self)
        task = data.pop("task")
        return {"task_id": task["id"], "category": task.get("category"), "fingerprint": fingerprint, **data}

    @classmethod
    def from_record(cls, record: Mapping[str, Any], task: Mapping[str, Any]) -> Outcome:
        fields = {key: value for key, value in record.items() if key not in ("task_id", "category", "fingerprint")}
        return cls(task=task, **fields)


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
    """The configuration's answer to the task; the server's errors propagate (``openai.APIStatusError``)."""
    extra = {"alignment": {**(configuration.alignment or {}), "return_details": True}}
    sampling = {"seed": seed, **configuration.sampling}
    started = time.perf_counter()
    if configuration.route == "chat":
        chat = await client.chat.completions.create(
            model=configuration.model, messages=task["messages"], extra_body=extra, **sampling
        )
        chat_choice, usage = chat.choices[0], chat.usage
        text, finish, choice_extra = (
            chat_choice.message.content or "",
            chat_choice.finish_reason,
            chat_choice.model_extra,
        )
    else:
        completion = await client.completions.create(
            model=configuration.model, prompt=task["prompt"], extra_body=extra, **sampling
        )
        completion_choice, usage = completion.choices[0], completion.usage
        text, finish, choice_extra = (
            completion_choice.text,
            completion_choice.finish_reason,
            completion_choice.model_extra,
        )
    seconds = time.perf_counter() - started
    cost = ((usage.model_extra or {}).get("alignment") or {}) if usage else {}
    return Outcome(
        task=task,
        configuration=configuration.name,
        text=text,
        passed=check(task, text),
        finish_reason=str(finish),
        prompt_tokens=usage.prompt_tokens if usage else 0,
        completion_tokens=usage.completion_tokens if usage else 0,
        details=(choice_extra or {}).get("alignment"),
        seconds=seconds,
        engine_calls=cost.get("engine_calls"),
    )


async def rewarded(client: openai.AsyncOpenAI, outcome: Outcome, target: RewardTarget) -> Outcome:
    """The outcome with its rewards and the base model's log-likelihood of its text (``POST /v1/rewards``)."""
    task = outcome.task
    pair: dict[str, Any] = {"response": outcome.text}
    if "messages" in task:
        pair["messages"] = task["messages"]
    else:
        pair["prompt"] = task["prompt"]
    body = {"model": target.model, "scorers": list(target.scorers), "input": [pair], "loglikelihood": True}
    result: Any = await client.post("/rewards", cast_to=object, body=body)
    scored = result["data"][0]
    return replace(
        outcome,
        rewards=scored["rewards"],
        loglikelihood=scored.get("loglikelihood"),
        response_tokens=scored.get("response_tokens"),
    )
