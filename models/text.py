"""Incremental detokenisation with stop strings, shared by engine backends."""

from __future__ import annotations

from collections.abc import Callable, Sequence

_INCOMPLETE_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, cut at the first stop string.

    Text that could still become the start of a stop string is held back, and
    so is a trailing partial UTF-8 character, so a stream never emits text
    that the final answer does not contain.

    Args:
        decode: token ids -> text (special tokens skipped).
        stop: stop strings; the output ends before the first one found.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stop = tuple(s for s in stop if s)
        self._holdback = max((len(s) for s in self._stop), default=1) - 1
        self._ids: list[int] = []
        self._text = ""
        self._emitted = 0
        self.stopped = False

    @property
    def text(self) -> str:
        """The output so far, ending before a stop string if one was hit."""
        return self._text

    def push(self, token_id: int) -> str:
        """Adds a token; returns the text that is now safe to emit."""
        if self.stopped:
            raise RuntimeError("push() after a stop string was reached")
        self._ids.append(token_id)
        text = self._decode(self._ids)
        if text.endswith(_INCOMPLETE_CHAR):
            return ""
        stop_at = self._first_stop(text)
        if stop_at is not None:
            self.stopped = True
            self._text = text[:stop_at]
            return self._emit(stop_at)
        self._text = text
        return self._emit(len(text) - self._holdback)

    def flush(self) -> str:
        """Emits everything held back; call once the sequence has ended."""
        return self._emit(len(self._text))

    def _first_stop(self, text: str) -> int | None:
        found = [i for i in (text.find(s, self._emitted) for s in self._stop) if i >= 0]
        return min(found, default=None)

    def _emit(self, end: int) -> str:
        if end <= self._emitted:
            return ""
        delta = self._text[self._emitted : end]
        self._emitted = end
        return delta
