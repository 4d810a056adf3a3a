"""METHODS.md §1's identities through HTTP on the tiny models with their real tokenizers.

They hold only because each model continues from its own token ids: re-encoding a model's own
text at a hand-over (a nudge that stopped mid-word, a non-canonical tokenisation) changes its
greedy continuation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest

from decoding.base import plain_text_prompt
from models.tokenizer import Tokenizer

MESSAGES = [{"role": "user", "content": "Tell me about rivers."}]
MAX_TOKENS = 24


def nudged(client: openai.OpenAI, base: str, nudger: str, gamma: float) -> tuple[str, dict[str, Any]]:
    chat = client.chat.completions.create(
        model=base,
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body={"alignment": {"nudging": {"nudger": nudger, "gamma": gamma}, "return_details": True}},
    )
    text = chat.choices[0].message.content or ""
    return text, (chat.choices[0].model_extra or {})["alignment"]["nudging"]


def greedy_chat(client: openai.OpenAI, model: str) -> str:
    chat = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=96, temperature=0)  # type: ignore[arg-type]
    return chat.choices[0].message.content or ""


def test_gamma_one_gives_the_nudgers_greedy_answer(client: openai.OpenAI):
    text, details = nudged(client, "tiny-base", "tiny-chat", 1.0)
    assert details["nudged_token_fraction"] == 1.0 and details["rounds"] >= 2
    assert len(text) > 20 and greedy_chat(client, "tiny-chat").lstrip(" ").startswith(text), text


def test_gamma_zero_gives_the_nudgers_first_word_then_the_bases_greedy_answer(client: openai.OpenAI, tiny_models: Path):
    text, details = nudged(client, "tiny-base", "tiny-chat", 0.0)
    first = details["spans"][0]["text"]
    assert details["rounds"] == 0 and [span["source"] for span in details["spans"]] == ["tiny-chat", "tiny-base"]
    tokenizer = Tokenizer(tiny_models / "base", name="tiny-base")
    prompt = tokenizer.encode(plain_text_prompt(MESSAGES)) + tokenizer.encode_continuation(" " + first)
    base = client.completions.create(model="tiny-base", prompt=prompt, max_tokens=64, temperature=0)
    assert len(text) > len(first) + 10 and (first + base.choices[0].text).startswith(text), text


@pytest.mark.parametrize("gamma", [0.0, 0.2, 0.5, 0.8, 1.0])
def test_the_same_model_as_base_and_nudger_gives_its_greedy_answer(client: openai.OpenAI, gamma: float):
    text, _ = nudged(client, "tiny-chat", "tiny-chat", gamma)
    assert len(text) > 20 and greedy_chat(client, "tiny-chat").lstrip(" ").startswith(text), (gamma, text)
