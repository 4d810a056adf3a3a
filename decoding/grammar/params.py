"""``alignment.grammar``: its parameters, its details, and how it travels (``response_format``, vLLM workers)."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from decoding.base import MethodParams
from models.errors import InvalidRequestError

Syntax = Literal["ebnf", "json_schema", "regex", "lark"]

WORKER_ARG = "alignd_grammar"
"""The ``vllm_xargs`` key carrying a request's ``GrammarParams`` (JSON) to vLLM workers."""
VLLM_GRAMMAR_PLUGIN = "decoding.grammar.vllm_plugin:GrammarLogitsProcessor"
"""What vLLM's ``--logits-processors`` names to load the plugin."""


class GrammarParams(MethodParams):
    """``alignment.grammar``: output in a grammar; ASAp learns to sample it as the model would (also set by
    OpenAI's ``response_format``)."""

    syntax: Syntax = Field(default="ebnf", description="How `grammar` is written.")
    grammar: str = Field(min_length=1, description="The grammar, schema (JSON text or object) or regex.")
    mode: Literal["asap", "gcd"] = Field(
        default="asap", description="`asap`: grammar-aligned sampling (learns across requests); `gcd`: the mask only."
    )

    @field_validator("grammar", mode="before")
    @classmethod
    def _schema_as_text(cls, value: Any) -> Any:
        return json.dumps(value, sort_keys=True) if isinstance(value, dict) else value

    @property
    def digest(self) -> str:
        return hashlib.sha256(f"{self.syntax}\x00{self.grammar}".encode()).hexdigest()[:16]


class GrammarDetails(BaseModel):
    mode: str
    syntax: str
    grammar_hash: str
    complete: bool = Field(description="The output is a complete sentence of the grammar.")
    trie_key: str | None = Field(default=None, description="ASAp: the key of the trie this request learned in.")
    trie_nodes: int | None = Field(default=None, description="ASAp: nodes in this key's trie after the request.")
    root_efg: float | None = Field(default=None, description="ASAp: the learned upper bound on P(L) at the root.")


def response_format_grammar(response_format: dict[str, Any]) -> GrammarParams | None:
    """OpenAI's ``response_format`` as a (GCD, like OpenAI's) grammar."""
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarParams(syntax="json_schema", grammar='{"type": "object"}', mode="gcd")
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise InvalidRequestError("`response_format.json_schema.schema` must be an object.",
                                      param="response_format.json_schema.schema")  # fmt: skip
        return GrammarParams(syntax="json_schema", grammar=json.dumps(schema, sort_keys=True), mode="gcd")
    raise InvalidRequestError(
        f"`response_format.type` must be text, json_object or json_schema, got {kind!r}.", param="response_format"
    )
