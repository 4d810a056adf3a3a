"""Stream chunks framed once per stream are, byte for byte, the chunk models' own serialisation."""

from __future__ import annotations

import pytest

from server.protocol import (
    ChatChunkChoice,
    ChatCompletionChunk,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    DeltaMessage,
    Usage,
)
from server.serving import ChunkFrame

COMPLETION_CHOICES = [
    [CompletionChoice(index=0, text="Hello")],
    [CompletionChoice(index=1, text=' "quoted" \u00e9', logprobs=CompletionLogprobs(tokens=["a"], token_logprobs=[-0.5],
                                                                                 top_logprobs=[{"a": -0.5}],
                                                                                 text_offset=[0]))],
    [CompletionChoice(index=0, text="", finish_reason="stop", alignment={"nudging": {"nudged_fraction": 0.25}})],
    [CompletionChoice(index=0, text="a"), CompletionChoice(index=1, text="b")],
]  # fmt: skip
CHAT_CHOICES = [
    [ChatChunkChoice(index=0, delta=DeltaMessage(role="assistant", content=""))],
    [ChatChunkChoice(index=0, delta=DeltaMessage(content="Hi"))],
    [ChatChunkChoice(index=0, delta=DeltaMessage(), finish_reason="length", alignment={"best_of_n": {"chosen": 2}})],
]


@pytest.mark.parametrize("choices", COMPLETION_CHOICES)
def test_completion_chunks_match_the_model(choices: list[CompletionChoice]):
    envelope = CompletionResponse(id="cmpl-1", created=7, model="m", choices=[])
    whole = envelope.model_copy(update={"choices": choices})
    assert ChunkFrame(envelope).event(choices) == b"data: " + whole.model_dump_json().encode() + b"\n\n"


@pytest.mark.parametrize("choices", CHAT_CHOICES)
def test_chat_chunks_match_the_model(choices: list[ChatChunkChoice]):
    envelope = ChatCompletionChunk(id="chatcmpl-1", created=7, model="m", choices=[])
    whole = envelope.model_copy(update={"choices": choices})
    assert ChunkFrame(envelope).event(choices) == b"data: " + whole.model_dump_json().encode() + b"\n\n"


def test_a_whole_chunk_is_sent_as_it_is():
    envelope = CompletionResponse(id="cmpl-1", created=7, model="m", choices=[])
    usage = envelope.model_copy(update={"usage": Usage.of(3, 4)})
    assert ChunkFrame(envelope).event(usage) == b"data: " + usage.model_dump_json().encode() + b"\n\n"


def test_an_envelope_with_choices_is_refused():
    with pytest.raises(ValueError, match="empty choices"):
        ChunkFrame(CompletionResponse(id="c", created=1, model="m", choices=[CompletionChoice(index=0, text="x")]))
