"""Locust users for alignd: streaming completions and chat over a weighted mix of alignment profiles.

Every request streams. Besides each profile's end-to-end latency (until ``[DONE]``), two custom metrics are
recorded per profile: ``TTFT`` (time to the first content chunk) and ``ITL`` (the gap between consecutive
content chunks). A 429 is reported as a failure named ``429 model_overloaded`` in a row of its own (type
``REFUSED``), and the user waits the ``Retry-After`` it was given (as the ``openai`` client does), so refused
load is visible but does not skew the latency of served requests.

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 --headless -u 8 -r 8 -t 60s \\
        --mix plain=3,chat=2,best_of_4=1,guidelines=1,grammar=1,nudging=1

Options (also from the environment, e.g. ``LOCUST_MIX``): ``--base-model``, ``--chat-model``, ``--reward``,
``--mix``, ``--max-tokens``, ``--request-timeout``, ``--no-retry-after``. ``make loadtest`` starts a stack
and runs this file for a bounded time (see ``loadtest/run_locust.py``).
"""

from __future__ import annotations

import itertools
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import requests
from locust import HttpUser, constant, events, task
from locust.argument_parser import LocustArgumentParser

PROMPTS = (
    "Explain how a hash map handles collisions.",
    "Write a short note to a colleague about tomorrow's release.",
    "What should I check before running a database migration?",
    "Summarise the rules of chess in three sentences.",
    "How do I keep a sourdough starter alive?",
    "Give two arguments for and against remote work.",
)
PERSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA}}
DEFAULT_MIX = "plain=3,chat=2,best_of_4=1,guidelines=1,grammar=1,nudging=1"
# Longest Retry-After a user honours, as the openai client does.
MAX_RETRY_WAIT_S = 60.0


@dataclass(frozen=True)
class Profile:
    """One kind of request: the route and the body (without the fields every request shares)."""

    path: str
    body: Callable[[Any, str], dict[str, Any]]


def _completion(options: Any, prompt: str) -> dict[str, Any]:
    return {"model": options.base_model, "prompt": prompt}


def _chat(options: Any, prompt: str) -> dict[str, Any]:
    return {"model": options.chat_model, "messages": [{"role": "user", "content": prompt}]}


def _aligned(base: Callable[[Any, str], dict[str, Any]], alignment: Callable[[Any], dict[str, Any]]) -> Profile:
    path = "/v1/completions" if base is _completion else "/v1/chat/completions"
    return Profile(path, lambda options, prompt: {**base(options, prompt), **alignment(options)})


PROFILES: dict[str, Profile] = {
    "plain": Profile("/v1/completions", _completion),
    "chat": Profile("/v1/chat/completions", _chat),
    "best_of_4": _aligned(_chat, lambda o: {"alignment": {"best_of_n": {"n": 4, "reward": o.reward}}}),
    "guidelines": _aligned(_chat, lambda o: {"alignment": {"guidelines": {"top_k": 4}}}),
    "grammar": _aligned(_chat, lambda o: {"response_format": PERSON_FORMAT}),
    "nudging": _aligned(_completion, lambda o: {"alignment": {"nudging": {"nudger": o.chat_model, "gamma": 0.4}}}),
}


def parse_mix(text: str) -> dict[str, float]:
    """``plain=3,best_of_4=1`` -> weights by profile; unknown names and non-positive weights are errors."""
    mix: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, weight = item.partition("=")
        if name not in PROFILES:
            raise ValueError(f"unknown profile {name!r} in --mix (known: {', '.join(PROFILES)})")
        mix[name] = float(weight or 1)
        if mix[name] <= 0:
            raise ValueError(f"--mix weight of {name!r} must be positive")
    if not mix:
        raise ValueError("--mix names no profile")
    return mix


@events.init_command_line_parser.add_listener
def _options(parser: LocustArgumentParser) -> None:
    group = parser.add_argument_group("alignd")
    group.add_argument(
        "--base-model", env_var="LOCUST_BASE_MODEL", default="tiny-base", help="model for completions profiles"
    )
    group.add_argument(
        "--chat-model", env_var="LOCUST_CHAT_MODEL", default="tiny-chat", help="model for chat profiles; the nudger"
    )
    group.add_argument("--reward", env_var="LOCUST_REWARD", default="rm", help="scorer for best_of_4")
    group.add_argument(
        "--mix", env_var="LOCUST_MIX", default=DEFAULT_MIX, help=f"profile weights (known: {', '.join(PROFILES)})"
    )
    group.add_argument("--max-tokens", env_var="LOCUST_MAX_TOKENS", type=int, default=32)
    group.add_argument(
        "--request-timeout",
        env_var="LOCUST_REQUEST_TIMEOUT",
        type=float,
        default=120.0,
        help="seconds; a timeout is a failure",
    )
    group.add_argument(
        "--no-retry-after", env_var="LOCUST_NO_RETRY_AFTER", action="store_true", help="do not wait after a 429"
    )


@events.test_start.add_listener
def _check_mix(environment: Any, **_: Any) -> None:
    parse_mix(environment.parsed_options.mix)


class AligndUser(HttpUser):
    """A client that sends one streaming request after another (closed loop: concurrency = users)."""

    wait_time = constant(0)

    def on_start(self) -> None:
        self.options = self.environment.parsed_options
        mix = parse_mix(self.options.mix)
        self.names, self.weights = list(mix), list(mix.values())

    @task
    def aligned_request(self) -> None:
        name = random.choices(self.names, self.weights)[0]
        profile = PROFILES[name]
        body = {**profile.body(self.options, random.choice(PROMPTS)), "max_tokens": self.options.max_tokens,
                "stream": True}  # fmt: skip
        retry_after = self._stream(name, profile.path, body)
        if retry_after and not self.options.no_retry_after:
            time.sleep(min(retry_after, MAX_RETRY_WAIT_S))

    def _stream(self, name: str, path: str, body: dict[str, Any]) -> float:
        """Sends one request and records it; returns the Retry-After of a 429 (else 0)."""
        started = time.perf_counter()
        with self.client.post(
            path, json=body, name=name, stream=True, catch_response=True, timeout=self.options.request_timeout
        ) as response:
            if response.status_code != 200:
                response.failure(_error_name(response))
                if response.status_code != 429:
                    return 0.0
                # Refusals get their own row, so the profile's latency percentiles describe served requests.
                response.request_meta["request_type"] = "REFUSED"
                return float(response.headers.get("retry-after") or 0)
            try:
                arrivals, finished, error, size = _read_events(response)
            except requests.RequestException as exc:
                response.failure(f"stream broken: {type(exc).__name__}")
                return 0.0
            response.request_meta["response_time"] = (time.perf_counter() - started) * 1000
            response.request_meta["response_length"] = size
            if error is not None:
                response.failure(f"error in stream: {error.get('code') or error.get('type')}")
            elif not finished:
                response.failure("stream ended without a finish_reason")
            else:
                # A model may answer with nothing (its first token is EOS): served, but no token times.
                response.success()
                if arrivals:
                    self._record_token_times(name, started, arrivals)
        return 0.0

    def _record_token_times(self, name: str, started: float, arrivals: list[float]) -> None:
        fire = self.environment.events.request.fire
        fire(request_type="TTFT", name=name, response_time=(arrivals[0] - started) * 1000, response_length=0,
             exception=None, context={})  # fmt: skip
        for previous, current in itertools.pairwise(arrivals):
            fire(request_type="ITL", name=name, response_time=(current - previous) * 1000, response_length=0,
                 exception=None, context={})  # fmt: skip


def _read_events(response: requests.Response) -> tuple[list[float], bool, dict[str, Any] | None, int]:
    """Reads an OpenAI SSE stream: when each content chunk arrived, whether a choice finished, an error chunk if
    any, and the bytes read."""
    arrivals: list[float] = []
    finished = False
    size = 0
    for line in response.iter_lines():
        size += len(line) + 1
        if not line.startswith(b"data: "):
            continue
        data = line[len(b"data: ") :]
        if data == b"[DONE]":
            break
        chunk = json.loads(data)
        if "error" in chunk:
            return arrivals, finished, chunk["error"], size
        choices = chunk.get("choices", ())
        if any(_content(choice) for choice in choices):
            arrivals.append(time.perf_counter())
        finished = finished or any(choice.get("finish_reason") for choice in choices)
    return arrivals, finished, None, size


def _content(choice: dict[str, Any]) -> str:
    """A chunk's text: completions put it in ``text``, chat in ``delta.content``."""
    return choice.get("text") or (choice.get("delta") or {}).get("content") or ""


def _error_name(response: Any) -> str:
    """``429 model_overloaded``: the status and the OpenAI error code, so failures group by cause."""
    if response.status_code == 0:  # locust's stand-in when no response came (refused, timed out)
        return f"no response: {type(response.error).__name__}: {str(response.error)[:160]}"
    try:
        error = response.json().get("error", {})
    except ValueError:
        error = {}
    return f"{response.status_code} {error.get('code') or error.get('type') or 'no error body'}"
