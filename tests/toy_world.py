"""What the toy world's effect tests share: its held-out tasks, the configurations, running them through a
live gateway, and reporting what was measured (``pytest -s`` prints it)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from evaluation.gateway import LocalGateway
from evaluation.runner import Configuration, Outcome, run_configuration
from toyworld import world

KNOWLEDGE = ("capital", "country", "birth-year", "sum")
STOP = {"stop": ["\nUser:"], "max_tokens": 40}
GREEDY = {"temperature": 0, **STOP}
# The nudger's vocabulary is small (384 tokens, about two a word): a rule's answer with its suffix needs more.
CHAT_GREEDY = {"temperature": 0, "max_tokens": 96}
NUDGING = {"nudging": {"nudger": "toy-nudger", "gamma": 0.4}}


def held_out_tasks(world: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (world / "tasks.jsonl").read_text().splitlines()]


def seen_capitals(seed: int = 0) -> list[dict[str, Any]]:
    """Capital questions about the training split, which the chat models learned (the held-out ones they
    did not: their answers there are guesses)."""
    countries = world.make_world(seed).train_countries
    return [{**world.task("capital", f"What is the capital of {c.name}?", c.capital, "contains"), "id": f"seen-{i}"}
            for i, c in enumerate(countries)]  # fmt: skip


def abstention(outcomes: Sequence[Outcome], unknown: Sequence[bool]) -> tuple[float, float, list[float]]:
    """Precision and recall of the abstentions against the questions the model could not know, and the
    checker's score of each answered question."""
    abstained = [bool(o.details["abstain"]["abstained"]) for o in outcomes]  # type: ignore[index]
    caught = sum(a and u for a, u in zip(abstained, unknown, strict=True))
    answered = [float(bool(o.passed)) for o, a in zip(outcomes, abstained, strict=True) if not a]
    return caught / max(sum(abstained), 1), caught / max(sum(unknown), 1), answered


def of(tasks: Sequence[dict[str, Any]], *categories: str) -> list[dict[str, Any]]:
    return [task for task in tasks if task["category"] in categories]


def run(gateway: LocalGateway, tasks: Sequence[dict[str, Any]], configuration: Configuration) -> list[Outcome]:
    async def main() -> list[Outcome]:
        async with gateway.async_client() as client:
            return await run_configuration(client, tasks, configuration, concurrency=4)

    return asyncio.run(main())


def passed(outcomes: Sequence[Outcome]) -> list[float]:
    return [float(outcome.passed) for outcome in outcomes]


def nudged_fraction(outcomes: Sequence[Outcome]) -> float:
    """The mean over answers of the share of base tokens the nudger wrote (as the server reports it)."""
    fractions = [outcome.details["nudging"]["nudged_token_fraction"] for outcome in outcomes]  # type: ignore[index]
    return sum(fractions) / len(fractions)


def report(name: str, **numbers: Any) -> None:
    print(f"\n[toy world] {name}: " + ", ".join(f"{key} = {value}" for key, value in numbers.items()))
