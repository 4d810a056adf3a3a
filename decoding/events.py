"""What a stream shows of a request, in order: the text of each choice as it is made, then its end.

A stream is an incremental view of the same result a non-streaming request gets: the
``candidate`` of a ``ChoiceFinished`` is exactly that choice of the non-streaming result
(its text is the concatenation of the choice's ``TextDelta`` texts).
"""

from __future__ import annotations

from dataclasses import dataclass

from decoding.base import Candidate
from models.engine import TokenLogprob


@dataclass(frozen=True, slots=True)
class TextDelta:
    """New text (and its tokens' logprobs) of choice ``index``."""

    index: int
    text: str
    logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True, slots=True)
class ChoiceFinished:
    """Choice ``index`` is complete: its finish reason and what the methods recorded."""

    index: int
    candidate: Candidate


StreamEvent = TextDelta | ChoiceFinished
