"""Checkers: does an answer pass its task? Each takes the answer, the task's reference and its options.

- ``exact``: the answer, stripped, equals the reference;
- ``contains``: the reference appears in the answer (case-sensitive);
- ``last_number``: the last number in the answer equals the reference's;
- ``regex``: the answer matches ``pattern`` (``re.search``); with a reference, group 1 (or the match) equals it;
- ``refusal``: the answer refuses, by any of ``patterns`` (case-insensitive; a default set otherwise);
- ``json_schema``: the answer parses as JSON and is valid under ``schema`` (JSON Schema, draft 2020-12).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

REFUSAL_PATTERNS = (r"\bcan'?t help\b", r"\bcannot help\b", r"\bI can'?t\b", r"\bI won'?t\b", r"\bnot able to help\b")
_NUMBER = re.compile(r"-?\d+(?:[.,]\d+)*")

Checker = Callable[[str, Any, Mapping[str, Any]], bool]


def exact(answer: str, reference: Any, options: Mapping[str, Any]) -> bool:
    return answer.strip() == str(reference).strip()


def contains(answer: str, reference: Any, options: Mapping[str, Any]) -> bool:
    return str(reference) in answer


def last_number(answer: str, reference: Any, options: Mapping[str, Any]) -> bool:
    found, expected = _NUMBER.findall(answer), _NUMBER.findall(str(reference))
    return bool(found and expected) and _number(found[-1]) == _number(expected[-1])


def regex(answer: str, reference: Any, options: Mapping[str, Any]) -> bool:
    match = re.search(options["pattern"], answer)
    if match is None:
        return False
    return reference is None or (match.group(1) if match.groups() else match.group(0)) == str(reference)


def refusal(answer: str, reference: Any, options: Mapping[str, Any]) -> bool:
    patterns: Sequence[str] = options.get("patterns") or REFUSAL_PATTERNS
    return any(re.search(pattern, answer, flags=re.IGNORECASE) for pattern in patterns)


def json_schema(answer: str, reference: Any, options: Mapping[str, Any]) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(answer), options["schema"], cls=jsonschema.Draft202012Validator)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


CHECKERS: dict[str, Checker] = {
    "exact": exact, "contains": contains, "last_number": last_number, "regex": regex, "refusal": refusal,
    "json_schema": json_schema,
}  # fmt: skip


def check(task: Mapping[str, Any], answer: str) -> bool | None:
    """Whether ``answer`` passes ``task`` (its ``checker``, ``reference`` and the checker's options); None for a
    task without a checker (scored by reward only)."""
    name = task.get("checker")
    if name is None:
        return None
    if name not in CHECKERS:
        raise ValueError(f"unknown checker `{name}` (known: {', '.join(sorted(CHECKERS))})")
    return CHECKERS[name](answer, task.get("reference"), task)


def _number(text: str) -> float:
    return float(text.replace(",", ""))
