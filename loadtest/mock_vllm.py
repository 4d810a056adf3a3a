"""A mock vLLM worker: the part of vLLM's OpenAI API the gateway uses, answering without a model.

So the gateway's own cost can be measured with no model compute (and faults injected around it). It speaks:

- ``GET /health``, ``GET /v1/models`` (one served model with ``max_model_len``);
- ``POST /v1/completions`` with token-id prompts (one, or a batch), ``n``, ``max_tokens``, ``seed``,
  ``logprobs`` (legacy format, tokens spelled ``token_id:N`` as with ``return_tokens_as_token_ids``),
  ``prompt_logprobs``, ``return_token_ids``, and ``stream`` at ``--tokens-per-s`` per sequence after
  ``--ttft-ms``; an out-of-range token id is a 400 as vLLM gives it;
- ``POST /pooling`` (one score per input);
- ``GET /mock/stats``: requests served, TCP connections seen (distinct client ports), to check pooling, and
  completions by ``x-session-id``, to check which worker a request's calls reached, and the latest
  ``traceparent`` headers;
- ``PUT /mock/fault`` with ``{"fault": NAME}`` (``null`` to heal): every completion from then on fails so
  (see ``FAULTS``), to check what the gateway makes of a broken worker.

Generated tokens are a deterministic function of the seed, the choice and the position, drawn from
``--first-token-id`` .. ``--first-token-id + --distinct-tokens``; their text is ``" t<id>"``.

    python -m loadtest.mock_vllm --port 8100 --model tiny-base --tokens-per-s 50 --ttft-ms 20

``MockWorker`` runs it beside a test; ``managed_mock`` is the config of a model whose workers the gateway
launches and supervises as mocks (vLLM's command line: ``--model PATH --served-model-name NAME ...``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import subprocess
import sys
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import orjson
import uvicorn

from evaluation.gateway import free_port

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
JSON_HEADERS = [(b"content-type", b"application/json")]
SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
DONE = b"data: [DONE]\n\n"
FAULTS = {
    "truncate": "the response ends early: a stream without [DONE], a body shorter than its Content-Length",
    "garbage": "the body (or a stream's event) is not JSON",
    "shape": "JSON, but not a completion: no choices, or choices of the wrong types",
    "stall": "the response stops coming: no body, or no event after the first",
    "drop": "the connection is closed after the response has started",
}
STALL_S = 3600.0


@dataclass(frozen=True, slots=True)
class MockSettings:
    model: str = "tiny-base"
    max_model_len: int = 1024
    vocab_size: int = 2048
    first_token_id: int = 3
    distinct_tokens: int = 50
    tokens_per_s: float = 0.0
    ttft_ms: float = 0.0


DEFAULTS = MockSettings()


@dataclass(slots=True)
class MockStats:
    requests: int = 0
    connections: set[tuple[str, int]] = field(default_factory=set)
    sessions: Counter[str] = field(default_factory=Counter)
    """Completions by their ``x-session-id`` header: which requests' engine calls reached this worker."""
    traceparents: deque[str] = field(default_factory=lambda: deque(maxlen=1000))
    """The latest completions' W3C ``traceparent`` headers: the trace a call was part of."""

    def as_json(self) -> dict[str, Any]:
        return {"requests": self.requests, "connections": len(self.connections), "sessions": dict(self.sessions),
                "traceparents": list(self.traceparents)}  # fmt: skip


class BadRequest(Exception):
    pass


class MockVLLM:
    """The ASGI app: plain dictionaries and orjson, so the mock costs far less than what it measures."""

    def __init__(self, settings: MockSettings) -> None:
        self.settings = settings
        self.stats = MockStats()
        self.fault: str | None = None

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        self.stats.requests += 1
        if scope.get("client"):
            self.stats.connections.add(tuple(scope["client"]))
        route = (scope["method"], scope["path"])
        try:
            if route == ("GET", "/health"):
                await _respond(send, 200, b"")
            elif route == ("GET", "/v1/models"):
                await _respond_json(send, self.models())
            elif route == ("GET", "/mock/stats"):
                await _respond_json(send, self.stats.as_json())
            elif route == ("PUT", "/mock/fault"):
                self.fault = _fault((await _body(receive))["fault"])
                await _respond_json(send, {"fault": self.fault})
            elif route == ("POST", "/v1/completions") and self.fault is not None:
                await _faulty(self.fault, bool((await _body(receive)).get("stream")), send)
            elif route == ("POST", "/v1/completions"):
                headers = dict(scope["headers"])
                if b"x-session-id" in headers:
                    self.stats.sessions[headers[b"x-session-id"].decode()] += 1
                if b"traceparent" in headers:
                    self.stats.traceparents.append(headers[b"traceparent"].decode())
                await self.completions(await _body(receive), send)
            elif route == ("POST", "/pooling"):
                body = await _body(receive)
                inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
                await _respond_json(send, {"data": [{"index": i, "data": [0.0]} for i in range(len(inputs))]})
            else:
                await _respond_json(send, {"error": {"message": f"no route {route}"}}, status=404)
        except (BadRequest, KeyError, TypeError, ValueError) as exc:
            await _respond_json(send, {"error": {"message": str(exc), "type": "BadRequestError"}}, status=400)

    def models(self) -> dict[str, Any]:
        card = {"id": self.settings.model, "object": "model", "max_model_len": self.settings.max_model_len}
        return {"object": "list", "data": [card]}

    async def completions(self, body: dict[str, Any], send: Send) -> None:
        prompts = _prompts(body["prompt"], self.settings.vocab_size)
        n = int(body.get("n") or 1)
        max_tokens = int(body.get("max_tokens") or 16)
        seed = int(body.get("seed") or 0)
        logprobs = body.get("logprobs")
        if body.get("stream"):
            await self.stream(prompts[0], n, max_tokens, seed, logprobs, send)
            return
        choices = []
        for position, prompt in enumerate(prompts):
            extra = {}
            if body.get("prompt_logprobs") is not None:
                extra["prompt_logprobs"] = _prompt_logprobs(prompt, int(body["prompt_logprobs"]), self.settings)
            for i in range(n):
                ids = [self.token(seed, i, t) for t in range(max_tokens)]
                choices.append({**self.choice(position * n + i, ids, logprobs, "length"), **extra})
        usage = {"prompt_tokens": sum(map(len, prompts)), "completion_tokens": len(prompts) * n * max_tokens}
        await _respond_json(send, {"id": "cmpl-mock", "object": "text_completion", "created": int(time.time()),
                                   "model": self.settings.model, "choices": choices, "usage": usage})  # fmt: skip

    async def stream(
        self, prompt: list[int], n: int, max_tokens: int, seed: int, logprobs: int | None, send: Send
    ) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        if self.settings.ttft_ms:
            await asyncio.sleep(self.settings.ttft_ms / 1000)
        head = b'data: {"id":"cmpl-mock","object":"text_completion","created":%d,"model":"%s","choices":[' % (
            int(time.time()),
            self.settings.model.encode(),
        )
        interval = 1 / self.settings.tokens_per_s if self.settings.tokens_per_s else 0.0
        for t in range(max_tokens):
            if interval and t:
                await asyncio.sleep(interval)
            reason = "length" if t == max_tokens - 1 else None
            events = [
                head + orjson.dumps(self.choice(i, [self.token(seed, i, t)], logprobs, reason)) + b"]}\n\n"
                for i in range(n)
            ]
            await send({"type": "http.response.body", "body": b"".join(events), "more_body": True})
        await send({"type": "http.response.body", "body": DONE, "more_body": False})

    def token(self, seed: int, choice: int, position: int) -> int:
        return self.settings.first_token_id + (seed * 31 + choice * 7 + position) % self.settings.distinct_tokens

    def choice(self, index: int, ids: list[int], logprobs: int | None, reason: str | None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": index, "text": "".join(f" t{i}" for i in ids), "token_ids": ids,
                                  "logprobs": None, "finish_reason": reason, "stop_reason": None}  # fmt: skip
        if logprobs is not None:
            choice["logprobs"] = _logprobs(ids, int(logprobs), self.settings)
        return choice


def _fault(name: Any) -> str | None:
    if name is not None and name not in FAULTS:
        raise BadRequest(f"unknown fault {name!r}; one of {', '.join(FAULTS)}")
    return name


class DroppedConnection(Exception):
    """Raised after the response has started: the server closes the connection mid-response."""


async def _faulty(fault: str, stream: bool, send: Send) -> None:
    """A completion that fails as ``fault`` says (see ``FAULTS``)."""
    event = b'data: {"id":"cmpl-mock","object":"text_completion","choices":[{"index":0,"text":" t3",' \
            b'"token_ids":[3],"logprobs":null,"finish_reason":null}]}\n\n'  # fmt: skip
    first = {"truncate": event, "garbage": b"data: {not json\n\n", "stall": event, "drop": event,
             "shape": b'data: {"choices":[{"index":"first","token_ids":7}]}\n\n'}[fault]  # fmt: skip
    if not stream:
        first = {"garbage": b"<html>upstream broke</html>", "shape": b'{"object":"text_completion"}'}.get(fault, b"{")
    length = [(b"content-length", b"4096")] if fault == "truncate" and not stream else []
    await send({"type": "http.response.start", "status": 200,
                "headers": (SSE_HEADERS if stream else JSON_HEADERS) + length})  # fmt: skip
    if fault == "stall" and not stream:
        await asyncio.sleep(STALL_S)
    await send({"type": "http.response.body", "body": first, "more_body": fault in ("stall", "drop")})
    if fault == "stall":
        await asyncio.sleep(STALL_S)
    if fault == "drop":
        raise DroppedConnection("the mock drops this connection")


def _prompts(prompt: Any, vocab_size: int) -> list[list[int]]:
    """Token-id prompts only: the gateway always sends ids."""
    prompts = prompt if prompt and isinstance(prompt[0], list) else [prompt]
    for ids in prompts:
        if not ids or not all(isinstance(i, int) for i in ids):
            raise BadRequest("prompt must be token ids")
        if any(not 0 <= i < vocab_size for i in ids):
            raise BadRequest(f"Token id out of vocabulary (size {vocab_size}).")
    return prompts


def _logprobs(ids: list[int], k: int, settings: MockSettings) -> dict[str, Any]:
    alternatives = _alternatives(k - 1, settings)
    return {
        "tokens": [f"token_id:{i}" for i in ids],
        "token_logprobs": [-0.5] * len(ids),
        "top_logprobs": [{f"token_id:{i}": -0.5, **{f"token_id:{a}": -2.0 - j for j, a in enumerate(alternatives)}}
                         for i in ids],
        "text_offset": list(itertools.accumulate((len(f" t{i}") for i in ids[:-1]), initial=0)),
    }  # fmt: skip


def _prompt_logprobs(prompt: list[int], k: int, settings: MockSettings) -> list[dict[str, Any] | None]:
    """vLLM's shape: nothing for the first token, then the actual token (ranked first here) and the top ``k``."""
    alternatives = _alternatives(k, settings)
    entries: list[dict[str, Any] | None] = [None]
    for token_id in prompt[1:]:
        ranked = [token_id, *(a for a in alternatives if a != token_id)][: max(k, 1)]
        entries.append({str(i): {"logprob": -1.0 - rank, "rank": rank + 1, "decoded_token": f"token_id:{i}"}
                        for rank, i in enumerate(ranked)})  # fmt: skip
    return entries


def _alternatives(k: int, settings: MockSettings) -> list[int]:
    """Token ids the mock never generates, as the runners-up of every distribution."""
    return [settings.first_token_id + settings.distinct_tokens + j for j in range(k)]


async def _body(receive: Receive) -> dict[str, Any]:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    return orjson.loads(b"".join(chunks))


async def _respond(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers or []})
    await send({"type": "http.response.body", "body": body})


async def _respond_json(send: Send, data: Any, status: int = 200) -> None:
    await _respond(send, status, orjson.dumps(data), JSON_HEADERS)


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


class MockWorker:
    """The mock in a subprocess on a free loopback port, started and healthy on return; ``stop`` (or leaving
    the ``with`` block) ends it. ``options`` are its command-line flags without dashes (``tokens_per_s=50``)."""

    def __init__(self, model: str, **options: float | int | str) -> None:
        self.model = model
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        flags = [item for key, value in options.items() for item in (f"--{key.replace('_', '-')}", str(value))]
        command = [sys.executable, "-m", "loadtest.mock_vllm", "--port", str(self.port), "--model", model, *flags]
        self.process = subprocess.Popen(command, cwd=Path(__file__).parents[1])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.process.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the mock vLLM worker did not start ({' '.join(command)})")

    def served_model(self, tokenizer: str = "base") -> dict[str, Any]:
        """The alignd config entry of a ``vllm`` model served by this mock (``tokenizer``: the model
        directory whose tokenizer the gateway loads, under ``model_root``)."""
        return {"name": self.model, "backend": "vllm", "path": tokenizer,
                "vllm": {"urls": [self.url], "grammar_plugin": False}}  # fmt: skip

    def stats(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.url}/mock/stats", timeout=5).json())

    def inject(self, fault: str | None) -> None:
        """Every completion from now on fails as ``fault`` says (one of ``FAULTS``; None: heal)."""
        httpx.put(f"{self.url}/mock/fault", json={"fault": fault}, timeout=5).raise_for_status()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def __enter__(self) -> MockWorker:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()


def managed_mock(name: str, replicas: int = 1, **options: float | int | str) -> dict[str, Any]:
    """The alignd config entry of a ``vllm`` model whose ``replicas`` managed workers are this mock, with
    ``options`` as its flags (``tokens_per_s=50``); it reads the tiny models' ``base`` tokenizer."""
    flags = [item for key, value in options.items() for item in (f"--{key.replace('_', '-')}", str(value))]
    command = [sys.executable, "-m", "loadtest.mock_vllm", *flags]
    vllm = {"command": command, "replicas": replicas, "grammar_plugin": False,
            "env": {"PYTHONPATH": str(Path(__file__).parents[1])}}  # fmt: skip
    return {"name": name, "backend": "vllm", "path": "base", "vllm": vllm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--model", default=DEFAULTS.model, help="the served model name")
    parser.add_argument(
        "--served-model-name", help="overrides --model, so the gateway can launch the mock as a managed worker"
    )
    parser.add_argument("--max-model-len", type=int, default=DEFAULTS.max_model_len)
    parser.add_argument("--vocab-size", type=int, default=DEFAULTS.vocab_size)
    parser.add_argument("--first-token-id", type=int, default=DEFAULTS.first_token_id)
    parser.add_argument("--distinct-tokens", type=int, default=DEFAULTS.distinct_tokens)
    parser.add_argument("--tokens-per-s", type=float, default=0.0, help="per sequence when streaming (0: at once)")
    parser.add_argument("--ttft-ms", type=float, default=0.0, help="time to the first streamed token")
    # A managed worker is also given vLLM's flags (--dtype, --max-logprobs, ...), which the mock ignores.
    args, _ = parser.parse_known_args()
    settings = MockSettings(args.served_model_name or args.model, args.max_model_len, args.vocab_size,
                            args.first_token_id, args.distinct_tokens, args.tokens_per_s, args.ttft_ms)  # fmt: skip
    uvicorn.run(MockVLLM(settings), host=args.host, port=args.port, loop="uvloop", http="httptools",
                access_log=False, log_level="warning", timeout_graceful_shutdown=1)  # fmt: skip


if __name__ == "__main__":
    main()
