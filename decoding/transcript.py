"""What each model of a multi-model method has been shown, as its own token ids.

A ``Piece`` is answer text one model wrote, with the token ids it wrote it with.
A model's ``View`` is its prompt and the pieces so far: its own pieces (and those of
a model sharing its tokenizer) as their token ids, anything else as text encoded
once, as a continuation, when the model is next called. Text a model wrote is never
re-encoded for it.
"""

from __future__ import annotations

from dataclasses import dataclass

from models.engine import Engine

_INCOMPLETE_CHAR = "\ufffd"


@dataclass(frozen=True, slots=True)
class Piece:
    """Text with its writer's token ids for ``text[:covered]`` (a cut inside a token leaves a rest)."""

    text: str
    token_ids: list[int]
    vocabulary: str
    covered: int


class View:
    """One model's prompt and the answer so far as its token ids.

    Args:
        engine: the model.
        prompt_ids: its prompt.
    """

    def __init__(self, engine: Engine, prompt_ids: list[int]) -> None:
        self.engine = engine
        self.vocabulary = engine.info.tokenizer_id
        self._ids = list(prompt_ids)
        self._prompt_len = len(prompt_ids)
        self._pending = ""

    def add(self, piece: Piece) -> None:
        self._ids, self._pending = self._added(piece)

    def ids(self) -> list[int]:
        """The prompt and the answer so far: what the model continues from."""
        if self._pending:
            self._ids = self._ids + self.engine.tokenizer.encode_continuation(self._pending)
            self._pending = ""
        return self._ids

    def ids_with(self, piece: Piece) -> list[int]:
        """What ``ids`` would be after ``add(piece)``, leaving the view as it is."""
        ids, pending = self._added(piece)
        return ids + self.engine.tokenizer.encode_continuation(pending) if pending else ids

    def answer_tokens(self) -> int:
        return len(self.ids()) - self._prompt_len

    def own_piece(self, token_ids: list[int], *, text: str | None = None) -> Piece:
        """A piece this model wrote with ``token_ids`` (up to its end of sequence): all of their text, or
        ``text``, a prefix of it, covered by the longest run of those tokens whose text begins it."""
        eos = self.engine.info.eos_token_ids
        ids = next((token_ids[:i] for i, token in enumerate(token_ids) if token in eos), token_ids)
        decode = self.engine.tokenizer.decode
        if text is None:
            while ids and decode(ids).endswith(_INCOMPLETE_CHAR):  # a character split across tokens: not yet text
                ids = ids[:-1]
            text = decode(ids)
            return Piece(text, ids, self.vocabulary, len(text))
        count, covered = 0, 0
        for end in range(1, len(ids) + 1):
            prefix = decode(ids[:end])
            if text.startswith(prefix) and not prefix.endswith(_INCOMPLETE_CHAR):
                count, covered = end, len(prefix)
        return Piece(text, ids[:count], self.vocabulary, covered)

    def _added(self, piece: Piece) -> tuple[list[int], str]:
        if self.vocabulary and piece.vocabulary == self.vocabulary and not self._pending:
            return self._ids + piece.token_ids, piece.text[piece.covered :]
        return self._ids, self._pending + piece.text
