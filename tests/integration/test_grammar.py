"""Grammar-constrained and grammar-aligned sampling through the HTTP API: on both engines (``stack_client``:
the in-process engine and vLLM CPU workers running alignd's plugin), and on the in-process engine."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
import yaml

from evaluation.gateway import LocalGateway

YES_NO = {"syntax": "ebnf", "grammar": 'root ::= ("yes" | "no") ("," ("yes" | "no"))*'}
YES_NO_RE = re.compile(r"(yes|no)(,(yes|no))*")
SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"}},
    "required": ["ok", "n"],
    "additionalProperties": False,
}


def details(choice: Any) -> dict[str, Any]:
    return (choice.model_extra or {}).get("alignment") or {}


@pytest.mark.parametrize("mode", ["asap", "gcd"])
def test_every_output_is_in_the_language(stack_client: openai.OpenAI, mode: str):
    completion = stack_client.completions.create(
        model="tiny-base",
        prompt="Answer:",
        max_tokens=40,
        n=4,
        seed=3,
        extra_body={"alignment": {"grammar": {**YES_NO, "mode": mode}, "return_details": True}},
    )
    assert any(details(choice)["grammar"]["complete"] for choice in completion.choices)
    for choice in completion.choices:
        record = details(choice)["grammar"]
        assert record["mode"] == mode
        if record["complete"]:
            assert YES_NO_RE.fullmatch(choice.text), choice.text
            assert choice.finish_reason == "stop"
        else:
            assert choice.finish_reason == "length" and YES_NO_RE.match(choice.text + "yes") is not None


def test_json_schema_outputs_validate(stack_client: openai.OpenAI):
    chat = stack_client.chat.completions.create(
        model="tiny-chat",
        messages=[{"role": "user", "content": "Reply in JSON."}],
        max_tokens=96,
        n=4,
        seed=1,
        response_format={"type": "json_schema", "json_schema": {"name": "reply", "schema": SCHEMA}},
        extra_body={"alignment": {"return_details": True}},
    )
    complete = [choice for choice in chat.choices if details(choice)["grammar"]["complete"]]
    assert complete, [choice.message.content for choice in chat.choices]
    for choice in complete:
        jsonschema.validate(json.loads(choice.message.content or ""), SCHEMA)


def test_the_trie_persists_and_learns_across_requests(client: openai.OpenAI):
    body = {"grammar": {**YES_NO, "mode": "asap"}, "return_details": True}
    seen = []
    for seed in range(3):
        completion = client.completions.create(
            model="tiny-base", prompt="Trie:", max_tokens=12, n=2, seed=seed, extra_body={"alignment": body}
        )
        seen.append(details(completion.choices[0])["grammar"])
    assert seen[0]["trie_nodes"] < seen[-1]["trie_nodes"]
    roots = [record["root_efg"] for record in seen]
    assert roots == sorted(roots, reverse=True)


async def test_concurrent_requests_share_the_trie_safely(async_client: openai.AsyncOpenAI):
    body = {"grammar": {**YES_NO, "mode": "asap"}, "return_details": True}

    async def ask(seed: int) -> list[str]:
        completion = await async_client.completions.create(
            model="tiny-base", prompt="Together:", max_tokens=16, n=2, seed=seed, extra_body={"alignment": body}
        )
        return [c.text for c in completion.choices if details(c)["grammar"]["complete"]]

    results = await asyncio.gather(*(ask(seed) for seed in range(6)))
    assert all(YES_NO_RE.fullmatch(text) for texts in results for text in texts)


def test_a_grammar_that_cannot_complete_is_cut_off_and_flagged(client: openai.OpenAI):
    long_literal = {"syntax": "ebnf", "grammar": 'root ::= "abcdefghijklmnopqrstuvwxyz0123456789abcdefghij"'}
    completion = client.completions.create(
        model="tiny-base",
        prompt="x",
        max_tokens=3,
        extra_body={"alignment": {"grammar": long_literal, "return_details": True}},
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "length" and details(choice)["grammar"]["complete"] is False
    assert "abcdefghijklmnopqrstuvwxyz0123456789abcdefghij".startswith(choice.text)


def test_grammar_with_best_of_n(stack_client: openai.OpenAI):
    completion = stack_client.completions.create(
        model="tiny-base",
        prompt="Answer:",
        max_tokens=30,
        extra_body={"alignment": {"grammar": YES_NO, "best_of_n": {"n": 3, "reward": "rm"}, "return_details": True}},
    )
    record = details(completion.choices[0])
    assert {"grammar", "best_of_n"} <= set(record) and len(record["best_of_n"]["candidates"]) == 3
    if record["grammar"]["complete"]:
        assert YES_NO_RE.fullmatch(completion.choices[0].text)


@pytest.mark.parametrize(
    ("alignment", "param", "message"),
    [
        ({"grammar": {"syntax": "ebnf", "grammar": "root ::= "}}, "alignment.grammar.grammar", "does not compile"),
        ({"grammar": {"syntax": "json_schema", "grammar": '{"type": "objec"}'}}, "alignment.grammar.grammar",
         "does not compile"),
        ({"grammar": {"syntax": "regex", "grammar": "a(b"}}, "alignment.grammar.grammar", "does not compile"),
        ({"grammar": {"syntax": "ebnf", "grammar": "root ::= " + '"x" ' * 5000}}, "alignment.grammar.grammar",
         "at most"),
        ({"grammar": YES_NO, "nudging": {"nudger": "tiny-chat"}}, "alignment.grammar", "nudging"),
        ({"grammar": {"syntax": "cfg", "grammar": "x"}}, "alignment.grammar.syntax", "ebnf"),
    ],
)  # fmt: skip
def test_bad_grammars(server: LocalGateway, alignment: dict[str, Any], param: str, message: str):
    body = {"model": "tiny-base", "prompt": "x", "max_tokens": 4, "alignment": alignment}
    response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"]


def test_bad_response_format(server: LocalGateway):
    body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == "response_format"


def test_what_asap_learned_can_be_listed_and_reset(server: LocalGateway, client: openai.OpenAI):
    body = {"grammar": {**YES_NO, "mode": "asap"}, "return_details": True}
    completion = client.completions.create(model="tiny-base", prompt="Admin:", max_tokens=12, n=2, seed=1,
                                           extra_body={"alignment": body})  # fmt: skip
    record = details(completion.choices[0])["grammar"]
    listed = {entry["key"]: entry for entry in httpx.get(f"{server.url}/admin/grammar/tries").json()["data"]}
    entry = listed[record["trie_key"]]
    assert entry["nodes"] == record["trie_nodes"] and entry["root_efg"] == record["root_efg"]
    assert entry["model"] == "tiny-base" and entry["grammar_hash"] == record["grammar_hash"]
    assert httpx.delete(f"{server.url}/admin/grammar/tries/{record['trie_key']}").json() == {"deleted": 1}
    assert record["trie_key"] not in {e["key"] for e in httpx.get(f"{server.url}/admin/grammar/tries").json()["data"]}
    missing = httpx.delete(f"{server.url}/admin/grammar/tries/{record['trie_key']}")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    again = client.completions.create(model="tiny-base", prompt="Admin:", max_tokens=12, n=2, seed=1,
                                      extra_body={"alignment": body})  # fmt: skip
    assert details(again.choices[0])["grammar"] == record  # a fresh trie learns the same way again


def test_what_asap_learned_survives_a_restart(tiny_models: Path, embeddings_cache: Path, tmp_path: Path):
    config = tmp_path / "alignd.yaml"
    tries = {"snapshot": str(tmp_path / "tries.json.gz"), "snapshot_interval_s": 3600}  # written at exit
    config.write_text(yaml.safe_dump({
        "model_root": str(tiny_models), "models": [{"name": "tiny-base", "path": "base"}], "tries": tries,
        "guidelines": {"cache_dir": str(embeddings_cache)},
    }))  # fmt: skip
    body = {"grammar": {**YES_NO, "mode": "asap"}, "return_details": True}

    def learned(gateway: LocalGateway) -> list[dict[str, Any]]:
        return httpx.get(f"{gateway.url}/admin/grammar/tries", timeout=10).json()["data"]

    with LocalGateway(config, tmp_path / "first.log") as first, first.client() as client:
        for seed in range(3):
            client.completions.create(model="tiny-base", prompt="Trie:", max_tokens=12, n=2, seed=seed,
                                      extra_body={"alignment": body})  # fmt: skip
        before = learned(first)
    assert before and before[0]["nodes"] > 1
    with LocalGateway(config, tmp_path / "second.log") as second, second.client() as client:
        assert learned(second) == before
        completion = client.completions.create(model="tiny-base", prompt="Trie:", max_tokens=12, seed=9,
                                               extra_body={"alignment": body})  # fmt: skip
        record = details(completion.choices[0])["grammar"]
        assert record["trie_nodes"] >= before[0]["nodes"] and record["root_efg"] <= before[0]["root_efg"]
