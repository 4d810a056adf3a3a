"""Property-based fuzzing of the HTTP API with schemathesis, from the server's own ``/openapi.json``.

Every operation gets generated requests, the typed ``alignment`` object and its combinations included;
names (models, profiles, scorers) are drawn from what the gateway serves, plus one it does not, so
requests reach the methods instead of stopping at a 404. Each response must be: no 5xx, answered within
its timeout, a 4xx that is OpenAI error JSON naming its ``param`` (404s name the model), and a 200
stream without an error event (every check that can fail runs before a stream's 200). The run is seeded:
``ALIGND_FUZZ_EXAMPLES`` sets the examples per operation (README: Reliability, for the long run).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from evaluation.gateway import LocalGateway

EXAMPLES = int(os.environ.get("ALIGND_FUZZ_EXAMPLES", "670"))
# About 50 ms a request on 2 cores; each request has its own 60 s bound (a hang fails it).
pytestmark = pytest.mark.timeout(300 + EXAMPLES)
CONFIG = """\
model_root: {root}
models:
  - {{name: tiny-base, path: base, max_model_len: 96}}
  - {{name: tiny-chat, path: chat, max_model_len: 96}}
  - {{name: tiny-chat-shared, path: chat-shared, max_model_len: 96}}
scorers:
  - {{name: rm, backend: hf, path: reward}}
  - {{name: is-json, backend: rule, rule: {{kind: json}}}}
guidelines:
  cache_dir: {embeddings}
profiles:
  - {{name: tiny-base-nudged, model: tiny-base, alignment: {{nudging: {{nudger: tiny-chat}}}}}}
  - {{name: tiny-base-transfer-q, model: tiny-base,
      alignment: {{transfer_q: {{baseline: tiny-chat-shared, reward: rm, top_k: 3, rollout_tokens: 2}}}}}}
  - {{name: tiny-base-genarm, model: tiny-base, alignment: {{genarm: {{reward_model: tiny-chat-shared, top_k: 3}}}}}}
  - {{name: tiny-chat-safe, model: tiny-chat, alignment: {{guidelines: {{top_k: 2}}, best_of_n: {{n: 2, reward: rm}}}}}}
  - {{name: tiny-chat-honest, model: tiny-chat, alignment: {{abstain: {{threshold: 1.0, fallback: tiny-chat-safe}}}}}}
limits:
  max_n: 4
  max_best_of_n: 4
  max_logprobs: 5
  default_max_tokens: 16
  max_grammar_bytes: 4096
  max_guided_work: 2000
  max_request_work: 4096
  max_nudging_rounds: 20
"""
MODELS = ["tiny-base", "tiny-chat", "tiny-chat-shared", "tiny-base-nudged", "tiny-base-transfer-q",
          "tiny-base-genarm", "tiny-chat-safe", "tiny-chat-honest", "not-served"]  # fmt: skip
SCORERS = ["rm", "is-json", "not-configured"]
NAMES = {"model": MODELS, "nudger": MODELS, "baseline": MODELS, "reward_model": MODELS, "fallback": MODELS,
         "reward": SCORERS, "baseline_reward": SCORERS, "scorers": SCORERS,
         "library": ["default", "none-such"]}  # fmt: skip
GENERATED = ("/v1/completions", "/v1/chat/completions", "/v1/rewards")
"""The operations whose bodies are generated (the others take none): each gets every example."""
statuses: Counter[int] = Counter()
refused: Counter[str] = Counter()
by_operation: Counter[str] = Counter()


def served_names(node: Any) -> Any:
    """The schema with every string naming a model or scorer drawn from ``NAMES`` (other types kept)."""
    if isinstance(node, list):
        return [served_names(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: served_names(value) for key, value in node.items()}
    for name, prop in out.get("properties", {}).items():
        if name in NAMES:
            out["properties"][name] = _with_enum(prop, NAMES[name])
    return out


def _with_enum(prop: dict[str, Any], names: list[str]) -> dict[str, Any]:
    if prop.get("type") == "string":
        return {**prop, "enum": names}
    if "anyOf" in prop:
        return {**prop, "anyOf": [_with_enum(branch, names) for branch in prop["anyOf"]]}
    if prop.get("type") == "array":
        return {**prop, "items": _with_enum(prop["items"], names)}
    return prop


@pytest.fixture(scope="module")
def fuzz_gateway(tiny_models: Path, embeddings_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    directory = tmp_path_factory.mktemp("fuzz-gateway")
    (directory / "alignd.yaml").write_text(CONFIG.format(root=tiny_models, embeddings=embeddings_cache))
    with LocalGateway(directory / "alignd.yaml", directory / "alignd.log") as live:
        yield live


@pytest.fixture(scope="module")
def api_schema(fuzz_gateway: LocalGateway) -> Any:
    raw = httpx.get(f"{fuzz_gateway.url}/openapi.json", timeout=10).json()
    schema = schemathesis.openapi.from_dict(served_names(raw))
    schema.config.update(base_url=fuzz_gateway.url)
    return schema


def check_response(case: Any, response: Any) -> None:
    statuses[response.status_code] += 1
    assert response.status_code < 500, (
        f"{case.method} {case.path} {json.dumps(case.body)[:2000]}: {response.text[:300]}"
    )
    if 400 <= response.status_code < 500:
        error = response.json().get("error")
        assert isinstance(error, dict) and error.get("message") and error.get("type"), response.text[:500]
        assert error.get("param") or response.status_code == 429, response.text[:500]
        refused[str(error.get("param"))] += 1
        if os.environ.get("ALIGND_FUZZ_DEBUG"):
            print("[fuzz]", error.get("param"), str(error.get("message"))[:160])
    elif any(value.startswith("text/event-stream") for value in response.headers.get("content-type", [])):
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", response.text[-300:]
        assert not any('"error"' in event[:12] for event in events), response.text[:500]


def operations(schema: Any) -> list[Any]:
    """Every operation but the one that forgets what ASAp learned (nothing to fuzz there)."""
    found = [result.ok() for result in schema.get_all_operations()]
    return [op for op in found if not (op.method.upper() == "DELETE" and op.path.startswith("/admin/grammar"))]


def test_every_response_is_a_success_or_a_clear_client_error(api_schema: Any) -> None:
    for operation in operations(api_schema):

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)  # fmt: skip
        def fuzz(case: Any) -> None:
            by_operation[f"{case.method} {case.path}"] += 1
            check_response(case, case.call(timeout=60))

        fuzz()


def test_the_fuzzer_sent_enough_requests() -> None:
    print("\n[fuzz] statuses: " + json.dumps(dict(sorted(statuses.items()))))
    print("[fuzz] requests by operation: " + json.dumps(dict(by_operation.most_common())))
    print("[fuzz] refusals by param: " + json.dumps(dict(refused.most_common(12))))
    assert sum(by_operation[f"POST {path}"] for path in GENERATED) >= len(GENERATED) * EXAMPLES
