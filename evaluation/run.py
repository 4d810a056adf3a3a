"""An evaluation run: every configuration of a matrix on its tasks, resumable, with a live progress bar.

Every finished request (its answer, rewards and log-likelihood) is appended to ``results.jsonl`` at once, so
an interrupted run resumes where it stopped: a rerun skips every (configuration, task) already there and
sends only the rest. A configuration whose definition changed since is refused rather than mixed.

Before the run, the deployment is checked: it answers ``/v1/models`` within seconds and serves every model
the matrix names; the scorers take a pair through ``/v1/rewards``; and each configuration's first request
goes alone, so a 4xx for a bad parameter stops the run with the server's own message before the rest are
sent. Later 4xx and 5xx answers are recorded per request (the report counts them); 401, 403, a 429 that
outlasts the client's retries (each waits out ``Retry-After``) and a lost connection stop the run.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
from tqdm import tqdm

from evaluation.matrix import Matrix
from evaluation.runner import Configuration, Outcome, RewardTarget, ask, rewarded, task_seed

RESULTS = "results.jsonl"


class EvaluationError(RuntimeError):
    """The run cannot go on (the deployment refused or is gone); what finished is kept in the results."""


@dataclass(frozen=True, slots=True)
class Unit:
    configuration: Configuration
    task: Mapping[str, Any]


def client_for(url: str, *, api_key: str | None, timeout: float, max_retries: int = 8) -> openai.AsyncOpenAI:
    """The official client: retries 429 and 5xx answers (honouring ``Retry-After``), connects within 5 s."""
    return openai.AsyncOpenAI(
        base_url=f"{url.rstrip('/')}/v1",
        api_key=api_key or "unused",
        max_retries=max_retries,
        timeout=openai.Timeout(timeout, connect=5.0),
    )


class Evaluation:
    """Runs ``matrix`` on ``tasks`` against the deployment behind ``client``, writing into ``output``."""

    def __init__(
        self,
        client: openai.AsyncOpenAI,
        matrix: Matrix,
        tasks: Sequence[Mapping[str, Any]],
        output: Path,
        *,
        concurrency: int = 4,
        progress: bool = True,
    ) -> None:
        self.client = client
        self.matrix = matrix
        self.tasks = list(tasks)
        self.configurations = matrix.expand()
        self.target = RewardTarget(tuple(matrix.reward.scorers), matrix.reward.model)
        self.output = output
        self.concurrency = concurrency
        self.progress = progress

    @property
    def results_path(self) -> Path:
        return self.output / RESULTS

    def units(self) -> list[Unit]:
        return [Unit(c, task) for c in self.configurations for task in self.tasks if c.applies_to(task)]

    async def run(self) -> dict[str, list[Outcome]]:
        """Every configuration's outcomes (resumed ones included), in task order."""
        self.output.mkdir(parents=True, exist_ok=True)
        done = self._load_done()
        await self._check_deployment()
        pending = [unit for unit in self.units() if (unit.configuration.name, unit.task["id"]) not in done]
        with (
            self.results_path.open("a", encoding="utf-8") as results,
            tqdm(total=len(pending), desc="alignd eval", unit="request", disable=not self.progress) as bar,
        ):

            async def finish(unit: Unit, *, first: bool) -> None:
                outcome = await self._outcome(unit, first=first)
                results.write(json.dumps(outcome.record(unit.configuration.fingerprint)) + "\n")
                results.flush()
                done[(unit.configuration.name, unit.task["id"])] = outcome
                bar.update()

            firsts = {unit.configuration.name: unit for unit in reversed(pending)}
            for unit in firsts.values():
                await finish(unit, first=True)
            gate = asyncio.Semaphore(self.concurrency)

            async def bounded(unit: Unit) -> None:
                async with gate:
                    await finish(unit, first=False)

            rest = [unit for unit in pending if firsts[unit.configuration.name] is not unit]
            await _all_or_nothing(bounded(unit) for unit in rest)
        return {c.name: [done[(c.name, t["id"])] for t in self.tasks if c.applies_to(t)] for c in self.configurations}

    async def _outcome(self, unit: Unit, *, first: bool) -> Outcome:
        configuration, task = unit.configuration, unit.task
        try:
            outcome = await ask(self.client, task, configuration, seed=task_seed(task, self.matrix.seed))
        except (openai.BadRequestError, openai.NotFoundError, openai.UnprocessableEntityError) as exc:
            if first:
                raise EvaluationError(
                    f"`{configuration.name}` was refused on its first task (`{task['id']}`): {_message(exc)}"
                ) from exc
            return _failed(unit, exc)
        except openai.InternalServerError as exc:
            return _failed(unit, exc)
        except openai.APIStatusError as exc:  # 401, 403, a 429 beyond the retries
            raise EvaluationError(f"the deployment refused `{configuration.name}`: {_message(exc)}") from exc
        except openai.APIConnectionError as exc:
            raise EvaluationError(f"lost the deployment at {self.client.base_url}: {exc}") from exc
        try:
            return await rewarded(self.client, outcome, self.target)
        except openai.APIStatusError as exc:
            raise EvaluationError(
                f"`/v1/rewards` refused an answer of `{configuration.name}`: {_message(exc)}"
            ) from exc

    async def _check_deployment(self) -> None:
        """Fails fast, before any generation: unreachable, unauthorised, or missing a model or scorer."""
        try:
            served = {model.id async for model in self.client.with_options(max_retries=1).models.list()}
        except openai.APIConnectionError as exc:
            raise EvaluationError(f"cannot reach the deployment at {self.client.base_url}: {exc}") from exc
        except openai.APIStatusError as exc:
            raise EvaluationError(f"the deployment refused `GET /v1/models`: {_message(exc)}") from exc
        missing = sorted(self.matrix.models() - served)
        if missing:
            raise EvaluationError(
                f"the deployment does not serve {', '.join(f'`{m}`' for m in missing)} (it serves: "
                f"{', '.join(sorted(served))})"
            )
        body = {"model": self.target.model, "scorers": list(self.target.scorers), "loglikelihood": True,
                "input": [{"prompt": "Hello.", "response": " Hello."}]}  # fmt: skip
        try:
            await self.client.post("/rewards", cast_to=object, body=body)
        except openai.APIStatusError as exc:
            raise EvaluationError(f"the matrix's `reward` was refused: {_message(exc)}") from exc

    def _load_done(self) -> dict[tuple[str, str], Outcome]:
        """Outcomes already in the results file; a line cut short by a kill is dropped (and redone)."""
        if not self.results_path.exists():
            return {}
        configurations = {c.name: c for c in self.configurations}
        tasks = {task["id"]: task for task in self.tasks}
        done: dict[tuple[str, str], Outcome] = {}
        lines = self.results_path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = []
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            kept.append(line if line.endswith("\n") else line + "\n")
            configuration = configurations.get(record["configuration"])
            if configuration is None or record["task_id"] not in tasks:
                continue
            if record["fingerprint"] != configuration.fingerprint:
                raise EvaluationError(
                    f"{self.results_path} holds results of a different `{configuration.name}`; write to a new "
                    "--output, or delete that file to start over"
                )
            done[(configuration.name, record["task_id"])] = Outcome.from_record(record, tasks[record["task_id"]])
        if len(kept) != len(lines):
            self.results_path.write_text("".join(kept), encoding="utf-8")
        return done


async def _all_or_nothing(coroutines: Any) -> None:
    """Runs them all; the first failure cancels the rest (and is raised), so a stopped run stops at once."""
    try:
        async with asyncio.TaskGroup() as group:
            for coroutine in coroutines:
                group.create_task(coroutine)
    except BaseExceptionGroup as failures:
        raise failures.exceptions[0] from None


def _failed(unit: Unit, exc: openai.APIStatusError) -> Outcome:
    return Outcome(
        task=unit.task, configuration=unit.configuration.name, text="", passed=None, finish_reason="error",
        prompt_tokens=0, completion_tokens=0, details=None, seconds=0.0, error=_message(exc),
    )  # fmt: skip


def _message(exc: openai.APIStatusError) -> str:
    """The server's own error message (OpenAI's error JSON), with its status."""
    body = exc.body if isinstance(exc.body, dict) else {}
    error = body.get("error", body) if isinstance(body, dict) else {}
    message = error.get("message") if isinstance(error, dict) else None
    return f"{exc.status_code} {message or exc.message}"
