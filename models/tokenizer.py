"""A Hugging Face tokenizer with what engines need of it: ids, text, chat templates, EOS."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from models.errors import InvalidRequestError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_ANCHOR = "\n"
"""Text that ends a pre-token in every common tokenizer: continuation text is encoded after it."""


class Tokenizer:
    """Tokenises, detokenises and renders chat prompts for one model.

    Args:
        path: a directory (or hub id) holding the tokenizer files.
        name: the model name, for error messages.
        extra_eos_ids: end-of-sequence ids besides the tokenizer's own
            (e.g. from the model's generation config).
    """

    def __init__(self, path: str | Path, *, name: str, extra_eos_ids: Sequence[int] = ()) -> None:
        from transformers import AutoTokenizer

        self.name = name
        self.hf: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(path)
        eos = {self.hf.eos_token_id} if self.hf.eos_token_id is not None else set()
        self.eos_ids = frozenset(eos | set(extra_eos_ids))
        self.has_chat_template = self.hf.chat_template is not None
        self.fingerprint = vocabulary_fingerprint(self.hf)
        self._anchor_ids = self.encode(_ANCHOR, add_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def encode_continuation(self, text: str) -> list[int]:
        """Ids of text that continues text already encoded: no special tokens, and none of the word-initial
        space that SentencePiece tokenizers put before a text of its own (``"wer"`` after ``" ans"``
        stays ``wer``, not ``▁wer``)."""
        anchored = self.encode(_ANCHOR + text, add_special_tokens=False)
        if anchored[: len(self._anchor_ids)] == self._anchor_ids:
            return anchored[len(self._anchor_ids) :]
        return self.encode(text, add_special_tokens=False)  # the text merged into the anchor's pre-token

    def prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        """A prompt as ids: text is encoded, token ids are checked against the vocabulary."""
        return self.encode(prompt) if isinstance(prompt, str) else self.check_ids(prompt)

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of ``token_ids`` as a client sees it: special tokens skipped, spaces untouched."""
        return str(self.hf.decode(list(token_ids), skip_special_tokens=True, clean_up_tokenization_spaces=False))

    def token_text(self, token_id: int) -> str:
        """One token's own text (special tokens spelled out), for logprobs."""
        return str(self.hf.decode([token_id]))

    def check_ids(self, token_ids: Sequence[int]) -> list[int]:
        ids = list(token_ids)
        if not ids or any(not 0 <= token < self.vocab_size for token in ids):
            raise InvalidRequestError(
                f"Token ids must be a non-empty list of integers in [0, {self.vocab_size}).", param="prompt"
            )
        return ids

    def render_chat(self, messages: Sequence[Mapping[str, str]]) -> str:
        from jinja2 import TemplateError

        if not self.has_chat_template:
            raise InvalidRequestError(
                f"The model `{self.name}` has no chat template; use /v1/completions.", param="messages"
            )
        try:
            rendered = self.hf.apply_chat_template(
                [dict(message) for message in messages], tokenize=False, add_generation_prompt=True
            )
        except TemplateError as exc:
            raise InvalidRequestError(f"The chat template rejected the messages: {exc}", param="messages") from exc
        return str(rendered)


def vocabulary_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A short hash of the token -> id map: equal hashes mean exchangeable token ids."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), separators=(",", ":"))
    return hashlib.sha256(vocab.encode()).hexdigest()[:16]
