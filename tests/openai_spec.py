"""The response shapes of OpenAI's published OpenAPI spec that alignd serves, as JSON Schema (2020-12).

Written from the component schemas of ``openapi.yaml`` in github.com/openai/openai-openapi (commit
f85dbe2, 2026): each definition keeps the spec's name, its required fields, their types, enums and
nullability; fields alignd never sends (audio, tool calls, annotations, service tiers) are left out,
and extra fields are allowed, as in the spec. Two places where the spec is stricter than OpenAI's own
API are relaxed, each marked ``# API:``.
"""

from __future__ import annotations

from typing import Any

NULL: dict[str, Any] = {"type": "null"}


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, NULL]}


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/$defs/{name}"}


def response(kind: str, choice: dict[str, Any], usage: dict[str, Any]) -> dict[str, Any]:
    """What every completion object has: id, ``object``, created, model, choices, usage."""
    return {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices"],
        "properties": {
            "id": {"type": "string"},
            "object": {"enum": [kind]},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {"type": "array", "items": {"type": "object", **choice}},
            "usage": usage,
        },
    }


TOP_LOGPROB = {
    "type": "object",
    "required": ["token", "logprob", "bytes"],
    "properties": {
        "token": {"type": "string"},
        "logprob": {"type": "number"},
        "bytes": nullable({"type": "array", "items": {"type": "integer"}}),
    },
}

DEFINITIONS: dict[str, Any] = {
    "CompletionUsage": {
        "type": "object",
        "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
        "properties": {name: {"type": "integer"} for name in ("prompt_tokens", "completion_tokens", "total_tokens")},
    },
    "ChatCompletionTokenLogprob": {
        **TOP_LOGPROB,
        "required": ["token", "logprob", "bytes", "top_logprobs"],
        "properties": {**TOP_LOGPROB["properties"], "top_logprobs": {"type": "array", "items": TOP_LOGPROB}},
    },
    "ChoiceLogprobs": nullable(
        {
            "type": "object",
            "required": ["content", "refusal"],
            "properties": {
                "content": nullable({"type": "array", "items": ref("ChatCompletionTokenLogprob")}),
                "refusal": nullable({"type": "array", "items": ref("ChatCompletionTokenLogprob")}),
            },
        }
    ),
    "ChatCompletionResponseMessage": {
        "type": "object",
        "required": ["role", "content", "refusal"],
        "properties": {
            "role": {"enum": ["assistant"]},
            "content": nullable({"type": "string"}),
            "refusal": nullable({"type": "string"}),
        },
    },
    "CreateChatCompletionResponse": response(
        "chat.completion",
        {
            "required": ["finish_reason", "index", "message", "logprobs"],
            "properties": {
                "finish_reason": {"enum": ["stop", "length", "tool_calls", "content_filter", "function_call"]},
                "index": {"type": "integer"},
                "message": ref("ChatCompletionResponseMessage"),
                "logprobs": ref("ChoiceLogprobs"),
            },
        },
        ref("CompletionUsage"),
    ),
    "ChatCompletionStreamResponseDelta": {
        "type": "object",
        "properties": {
            "content": nullable({"type": "string"}),
            "role": {"enum": ["developer", "system", "user", "assistant", "tool"]},
            "refusal": nullable({"type": "string"}),
        },
    },
    "CreateChatCompletionStreamResponse": response(
        "chat.completion.chunk",
        {
            "required": ["delta", "finish_reason", "index"],
            "properties": {
                "delta": ref("ChatCompletionStreamResponseDelta"),
                "logprobs": ref("ChoiceLogprobs"),
                "finish_reason": nullable(
                    {"enum": ["stop", "length", "tool_calls", "content_filter", "function_call"]}
                ),
                "index": {"type": "integer"},
            },
        },
        nullable(ref("CompletionUsage")),
    ),
    "CreateCompletionResponse": response(
        "text_completion",
        {
            "required": ["finish_reason", "index", "logprobs", "text"],
            "properties": {
                # API: streamed chunks (the spec has no schema of their own) carry null until the last.
                "finish_reason": nullable({"enum": ["stop", "length", "content_filter"]}),
                "index": {"type": "integer"},
                "logprobs": nullable(
                    {
                        "type": "object",
                        "properties": {
                            "text_offset": {"type": "array", "items": {"type": "integer"}},
                            # API: with `echo`, the first prompt token's logprob is null.
                            "token_logprobs": {"type": "array", "items": nullable({"type": "number"})},
                            "tokens": {"type": "array", "items": {"type": "string"}},
                            "top_logprobs": {
                                "type": "array",
                                "items": nullable({"type": "object", "additionalProperties": {"type": "number"}}),
                            },
                        },
                    }
                ),
                "text": {"type": "string"},
            },
        },
        ref("CompletionUsage"),
    ),
    "Model": {
        "type": "object",
        "required": ["id", "object", "created", "owned_by"],
        "properties": {
            "id": {"type": "string"},
            "object": {"enum": ["model"]},
            "created": {"type": "integer"},
            "owned_by": {"type": "string"},
        },
    },
    "ListModelsResponse": {
        "type": "object",
        "required": ["object", "data"],
        "properties": {"object": {"enum": ["list"]}, "data": {"type": "array", "items": ref("Model")}},
    },
    "Error": {
        "type": "object",
        "required": ["type", "message", "param", "code"],
        "properties": {
            "code": nullable({"type": "string"}),
            "message": {"type": "string"},
            "param": nullable({"type": "string"}),
            "type": {"type": "string"},
        },
    },
    "ErrorResponse": {"type": "object", "required": ["error"], "properties": {"error": ref("Error")}},
}


def schema(name: str) -> dict[str, Any]:
    """A validatable schema for one definition (the others reachable through ``$defs``)."""
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$defs": DEFINITIONS, **ref(name)}
