"""OpenAI protocol models: requests (fields in the OpenAI docs' order) and responses.

Parameters OpenAI defines but alignd does not implement are declared so a
client that sets them gets a 400 naming them instead of silent defaults.
Unknown fields are rejected the same way.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from decoding.alignment import AlignmentPatch
from decoding.base import PromptInput
from decoding.grammar import response_format_grammar
from models.engine import SamplingParams
from models.errors import UNSUPPORTED, cross_field_error

GREEDY_BELOW_TEMPERATURE = 1e-5
"""Temperatures below this are greedy (vLLM's sampling epsilon): logits divided by them overflow."""
# Every stop sequence is looked for after every token: their number and length bound that work.
MAX_STOP_SEQUENCES = 16
StopSequence = Annotated[str, Field(max_length=1000)]


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(OpenAIModel):
    include_usage: bool = False


def _schema_as_enforced(schema: dict[str, Any], cls: type[BaseModel]) -> None:
    """The generation requests' JSON schema says what the server enforces: an unsupported parameter takes
    only its "off" value, a prompt is not empty, ``top_logprobs`` needs ``logprobs``."""
    properties = schema.get("properties", {})
    for name, off in getattr(cls, "unsupported", {}).items():
        if name in properties:
            allowed = [{"type": "null"}] if off is None else [{"const": off}, {"type": "null"}]
            properties[name] = {"anyOf": allowed, "description": "Not supported by alignd: only its off value."}
    if "prompt" in properties:
        properties["prompt"]["anyOf"] = [
            {"type": "string", "minLength": 1},
            {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
        ]
    if "top_logprobs" in properties:
        schema["dependentSchemas"] = {
            "top_logprobs": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}}
        }


class _GenerationRequest(OpenAIModel):
    """Fields shared by both generation endpoints."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_schema_as_enforced)

    # OpenAI parameters alignd does not implement, with the value that means "off";
    # setting one to anything else (or to anything, where the value is None) is a 400.
    unsupported: ClassVar[dict[str, Any]] = {"frequency_penalty": 0, "logit_bias": {}, "presence_penalty": 0}

    model: str
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    n: int = Field(default=1, ge=1)
    presence_penalty: float | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    stop: StopSequence | list[StopSequence] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    user: str | None = None
    # alignd's extension (OpenAI SDKs send it with `extra_body`), typed from the method registry.
    alignment: AlignmentPatch | None = Field(  # type: ignore[valid-type]
        default=None,
        description="alignd's alignment methods for this request, merged over the profile's; see the README.",
    )

    logprobs_param: ClassVar[str] = "logprobs"
    """The request field that sets the number of logprobs (errors name it)."""

    @property
    def budget_param(self) -> str:
        """The request field that sets the token budget (errors name it)."""
        return "max_tokens"

    @property
    def grammar_param(self) -> str | None:
        """The request field outside ``alignment`` that gave the grammar, if one did (errors about it name it)."""
        return None

    @field_validator("*", mode="after")
    @classmethod
    def _reject_unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        name = info.field_name
        if name in cls.unsupported and value is not None and value != cls.unsupported[name]:
            raise PydanticCustomError(UNSUPPORTED, "`{name}` is not supported by alignd", {"name": name})
        return value

    @field_validator("stop")
    @classmethod
    def _bounded_stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        return stop

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def _sampling(self, *, logprobs: int | None, prompt_logprobs: int | None = None) -> SamplingParams:
        """Sampling as requested; the pipeline sets ``max_tokens`` once it knows the prompt's length. A
        temperature too small to divide logits by is greedy, as vLLM takes it."""
        return SamplingParams(
            temperature=self.temperature if self.temperature >= GREEDY_BELOW_TEMPERATURE else 0.0,
            top_p=self.top_p,
            n=self.n,
            stop=self.stop_strings,
            seed=self.seed,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )

    def alignment_fields(self) -> dict[str, Any] | None:
        """The fields of ``alignment`` the client set, as sent (merged over a profile's by the pipeline)."""
        return None if self.alignment is None else self.alignment.as_sent()


class CompletionRequest(_GenerationRequest):
    """``POST /v1/completions``: one prompt, as text or token ids."""

    unsupported: ClassVar[dict[str, Any]] = {**_GenerationRequest.unsupported, "best_of": 1, "suffix": None}

    prompt: str | list[int]
    best_of: int | None = None
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0)
    max_tokens: int = Field(default=16, ge=1)
    suffix: str | None = None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def prompt_input(self) -> PromptInput:
        if isinstance(self.prompt, str):
            return PromptInput(text=self.prompt)
        return PromptInput(token_ids=list(self.prompt))

    def sampling_params(self) -> SamplingParams:
        return self._sampling(logprobs=self.logprobs, prompt_logprobs=self.logprobs if self.echo else None)

    def alignment_object(self) -> dict[str, Any] | None:
        return self.alignment_fields()

    @field_validator("prompt", mode="before")
    @classmethod
    def _single_prompt(cls, prompt: Any) -> Any:
        """OpenAI also takes a batch (a list of prompts); alignd takes a batch of one."""
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            if len(prompt) != 1:
                raise PydanticCustomError(UNSUPPORTED, "batched prompts are not supported; send one prompt per request")
            prompt = prompt[0]
        if not prompt:
            raise ValueError("the prompt must not be empty")
        return prompt


class TextContentPart(OpenAIModel):
    type: Literal["text"]
    text: str


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextContentPart]
    name: str | None = None

    def to_template(self) -> dict[str, str]:
        """The message as chat templates expect it (``developer`` is a system message)."""
        text = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatCompletionRequest(_GenerationRequest):
    """``POST /v1/chat/completions``."""

    unsupported: ClassVar[dict[str, Any]] = {
        **_GenerationRequest.unsupported,
        **dict.fromkeys(("audio", "function_call", "modalities", "prediction", "reasoning_effort")),
        **dict.fromkeys(("tool_choice", "web_search_options")),
        "functions": [], "parallel_tool_calls": False, "tools": [],
    }  # fmt: skip

    messages: list[ChatMessage] = Field(min_length=1)
    audio: dict[str, Any] | None = None
    function_call: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    logprobs: bool = False
    max_completion_tokens: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)
    metadata: dict[str, str] | None = None
    modalities: list[str] | None = None
    parallel_tool_calls: bool | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    response_format: dict[str, Any] | None = None
    store: bool | None = None
    tool_choice: str | dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    top_logprobs: int | None = Field(default=None, ge=0)
    web_search_options: dict[str, Any] | None = None

    logprobs_param: ClassVar[str] = "top_logprobs"

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, top_logprobs: int | None, info: ValidationInfo) -> int | None:
        if top_logprobs is not None and not info.data.get("logprobs"):
            raise PydanticCustomError("logprobs_required", "requires `logprobs` to be true")
        return top_logprobs

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def budget_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens else "max_tokens"

    @property
    def grammar_param(self) -> str | None:
        explicit = self.alignment is not None and "grammar" in self.alignment.as_sent()
        return "response_format" if self.response_format and not explicit else None

    def prompt_input(self) -> PromptInput:
        return PromptInput(messages=[message.to_template() for message in self.messages])

    def sampling_params(self) -> SamplingParams:
        return self._sampling(logprobs=(self.top_logprobs or 0) if self.logprobs else None)

    def alignment_object(self) -> dict[str, Any] | None:
        """``response_format`` is a grammar (GCD, as OpenAI's); an explicit ``alignment.grammar`` wins."""
        alignment = self.alignment_fields()
        if not self.response_format or (alignment and "grammar" in alignment):
            return alignment
        grammar = response_format_grammar(self.response_format)
        if grammar is None:
            return alignment
        return {**(alignment or {}), "grammar": grammar.model_dump()}


# Responses ------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class ModelTokens(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class AlignmentUsage(BaseModel):
    """Where a request's tokens went: what a cost comparison of alignment methods needs."""

    engine_calls: int = Field(description="Engine calls over every model the request used.")
    reward_calls: int = Field(default=0, description="Calls to reward scorers (each scores a batch of responses).")
    models: dict[str, ModelTokens] = Field(description="Tokens per model (a model's prompt counts once per call).")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    alignment: AlignmentUsage | None = Field(
        default=None, exclude_if=lambda value: value is None, description="With `alignment.return_details`."
    )

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, alignment: AlignmentUsage | None = None) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            alignment=alignment,
        )


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = []
    token_logprobs: list[float | None] = []
    tokens: list[str] = []
    top_logprobs: list[dict[str, float] | None] = []


ALIGNMENT_DETAILS = Field(
    default=None, exclude_if=lambda value: value is None, description="What each alignment method did (on request)."
)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    alignment: dict[str, Any] | None = ALIGNMENT_DETAILS


class CompletionResponse(BaseModel):
    """A completion, or one chunk of a streamed one (OpenAI's schema has no null ``usage``: chunks omit it)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = Field(default=None, exclude_if=lambda value: value is None)


class TopLogprobOut(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprobOut):
    top_logprobs: list[TopLogprobOut] = []


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None
    refusal: list[ChatTokenLogprob] | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: str | None = None


class ChatCompletionChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"]
    alignment: dict[str, Any] | None = ALIGNMENT_DETAILS


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage


class DeltaMessage(BaseModel):
    """A streamed message fragment; fields that did not change are left out."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_unchanged(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    alignment: dict[str, Any] | None = ALIGNMENT_DETAILS


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "alignd"
    max_model_len: int
    root: str | None = Field(default=None, description="For a profile: the model it runs on.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# Rewards --------------------------------------------------------------------


class RewardInput(OpenAIModel):
    """One (prompt, response) pair: the prompt as text, or as chat messages that ``model`` renders."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"oneOf": [
        {"required": ["prompt"], "properties": {"prompt": {"type": "string"}, "messages": {"type": "null"}}},
        {"required": ["messages"], "properties": {"messages": {"type": "array"}, "prompt": {"type": "null"}}},
    ]})  # fmt: skip

    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    response: str

    @model_validator(mode="after")
    def _one_prompt(self) -> Self:
        if (self.prompt is None) == (self.messages is None):
            raise cross_field_error("messages", "Give exactly one of `prompt` and `messages`.")
        return self

    def prompt_input(self) -> PromptInput:
        if self.messages is not None:
            return PromptInput(messages=[message.to_template() for message in self.messages])
        return PromptInput(text=self.prompt)


class RewardRequest(OpenAIModel):
    """``POST /v1/rewards``: scores (prompt, response) pairs with the server's scorers, as the methods do."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"anyOf": [
        {"required": ["scorers"], "properties": {"scorers": {"minItems": 1}}},
        {"required": ["loglikelihood"], "properties": {"loglikelihood": {"const": True}}},
    ]})  # fmt: skip

    model: str | None = Field(
        default=None,
        description="A served model or profile. It renders `messages` into the prompt text the scorers see, as a "
        "multi-model method on it would (its chat template, else alignd's plain-text chat), and gives "
        "`loglikelihood`.",
    )
    scorers: list[str] = Field(default_factory=list, max_length=16, description="Configured reward scorers.")
    input: list[RewardInput] = Field(min_length=1)
    loglikelihood: bool = Field(
        default=False, description="Also the log-probability of each response under `model`, given its prompt."
    )

    @model_validator(mode="after")
    def _something_to_compute(self) -> Self:
        if not self.scorers and not self.loglikelihood:
            raise cross_field_error("scorers", "Name at least one scorer in `scorers`, or ask for `loglikelihood`.")
        if self.model is None and (self.loglikelihood or any(item.messages is not None for item in self.input)):
            raise cross_field_error("model", "`model` is needed to render `messages` and for `loglikelihood`.")
        return self


class Reward(BaseModel):
    object: Literal["reward"] = "reward"
    index: int
    rewards: dict[str, float] = Field(description="Each scorer's reward of the pair.")
    loglikelihood: float | None = Field(
        default=None,
        exclude_if=lambda value: value is None,
        description="log p(response | prompt) under `model`, summed over the response's tokens.",
    )
    response_tokens: int | None = Field(
        default=None, exclude_if=lambda value: value is None, description="The response's tokens under `model`."
    )


class RewardList(BaseModel):
    object: Literal["list"] = "list"
    model: str | None = None
    data: list[Reward]
