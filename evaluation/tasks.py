"""Task files: one JSON object per line, validated before anything runs, and converters for public formats.

A task has ``messages`` (chat) or ``prompt`` (text; both may be given: the chat route sends the messages, the
completions route the prompt), an ``id``, a ``category``, and optionally what to check: a ``checker`` with
its ``reference`` and options (``pattern`` for ``regex``, ``patterns`` for ``refusal``, ``schema`` for
``json_schema``). A task without a checker is scored by reward only (a preference-prompt file).

Formats (``--format``):

- ``alignd``: the task format above (what ``alignd make-toy-world`` writes);
- ``gsm8k``: ``question`` and ``answer``, the reference being the number after the answer's ``####``, checked
  with ``last_number``;
- ``prompts``: ``prompt`` only (text or a list of chat messages), no checker.

Converted tasks carry both ``messages`` and ``prompt``, the chat in alignd's plain-text format (what nudging
and Transfer-Q* give a base model without a chat template), so a base model can be asked on the completions
route exactly as those methods ask it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from evaluation.checkers import CHECKERS

Format = Literal["alignd", "gsm8k", "prompts"]


class TaskFileError(ValueError):
    """A task file that cannot be run: every bad line, with its number and the reason."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        self.problems = problems
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        super().__init__(f"{path}: {len(problems)} bad line(s):\n  {shown}")


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str


class Task(BaseModel):
    """One task; fields beyond these are kept (they travel into the results)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    id: str = Field(min_length=1)
    category: str = "default"
    messages: list[Message] | None = Field(default=None, min_length=1)
    prompt: str | None = None
    checker: str | None = None
    reference: str | int | float | None = None
    pattern: str | None = None
    patterns: list[str] | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")

    @model_validator(mode="after")
    def _runnable(self) -> Self:
        if self.messages is None and self.prompt is None:
            raise ValueError("a task needs `messages` or `prompt`")
        if self.checker is not None and self.checker not in CHECKERS:
            raise ValueError(f"unknown checker `{self.checker}` (known: {', '.join(sorted(CHECKERS))})")
        needs = {"regex": ("pattern", self.pattern), "json_schema": ("schema", self.schema_)}
        if self.checker in needs and needs[self.checker][1] is None:
            raise ValueError(f"the checker `{self.checker}` needs `{needs[self.checker][0]}`")
        if self.checker in ("exact", "contains", "last_number") and self.reference is None:
            raise ValueError(f"the checker `{self.checker}` needs `reference`")
        return self


@dataclass(frozen=True, slots=True)
class TaskFile:
    tasks: list[dict[str, Any]]
    skipped: list[str] = field(default_factory=list)
    """With ``skip_bad``: each line left out, with its number and the reason."""


def load_tasks(path: Path, *, format: Format = "alignd", skip_bad: bool = False) -> TaskFile:
    """The file's tasks as plain dicts. Bad lines raise ``TaskFileError`` naming each, unless ``skip_bad``
    (then they are left out and listed). Ids must be unique: results are keyed by them."""
    convert = CONVERTERS[format]
    tasks: list[dict[str, Any]] = []
    problems: list[str] = []
    seen: set[str] = set()
    for number, line in _lines(path):
        try:
            task = Task.model_validate(convert(json.loads(line), number))
        except (ValueError, ValidationError) as exc:
            problems.append(f"line {number}: {_reason(exc)}")
            continue
        if task.id in seen:
            problems.append(f"line {number}: the id `{task.id}` appears twice")
            continue
        seen.add(task.id)
        tasks.append(task.model_dump(by_alias=True, exclude_none=True))
    if problems and not skip_bad:
        raise TaskFileError(path, problems)
    if not tasks:
        raise TaskFileError(path, problems or ["no tasks"])
    return TaskFile(tasks, problems)


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    with path.open(encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if line.strip():
                yield number, line


def _reason(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or 'task'}: {error['msg'].removeprefix('Value error, ')}"
            for error in exc.errors()
        )
    if isinstance(exc, json.JSONDecodeError):
        return f"not JSON ({exc.msg} at column {exc.colno})"
    return str(exc)


def _alignd(item: Any, number: int) -> Any:
    return item


def plain_text_chat(messages: list[dict[str, str]]) -> str:
    """alignd's plain-text chat (``decoding.base.plain_text_prompt``; a test keeps the two equal)."""
    lines = [f"{m['content']}\n" if m["role"] == "system" else
             f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in messages]  # fmt: skip
    return "\n".join([*lines, "Assistant:"])


def _gsm8k(item: Any, number: int) -> dict[str, Any]:
    """``{"question", "answer"}``: the reference is what follows the answer's ``####`` (its final number)."""
    if not isinstance(item, dict) or not isinstance(item.get("question"), str):
        raise ValueError("a GSM8K line needs `question` (text) and `answer`")
    answer = str(item.get("answer", ""))
    if "####" not in answer:
        raise ValueError("the `answer` has no `#### <number>` final answer")
    messages = [{"role": "user", "content": item["question"]}]
    return {
        "id": str(item.get("id", f"gsm8k-{number:05d}")),
        "category": "gsm8k",
        "messages": messages,
        "prompt": plain_text_chat(messages),
        "reference": answer.rsplit("####", 1)[1].strip(),
        "checker": "last_number",
    }


def _prompts(item: Any, number: int) -> dict[str, Any]:
    """``{"prompt": text | messages}``: reward only, no checker."""
    prompt = item.get("prompt") if isinstance(item, dict) else None
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in prompt):
        messages = prompt
    else:
        raise ValueError("a preference-prompt line needs `prompt` (text or chat messages)")
    return {"id": str(item.get("id", f"prompt-{number:05d}")), "category": str(item.get("category", "prompts")),
            "messages": messages, "prompt": plain_text_chat(messages)}  # fmt: skip


CONVERTERS: dict[str, Callable[[Any, int], Any]] = {"alignd": _alignd, "gsm8k": _gsm8k, "prompts": _prompts}
