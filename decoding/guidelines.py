"""Guideline retrieval (Guide-Align, Luo et al. 2024): retrieve guidelines for the request, inject them.

Each guideline in a library (JSONL: ``id``, ``title``, ``text``, ``category``,
``triggers``) is indexed by the embeddings of its trigger inputs
(``mode: trigger``, the default: a symmetric query -> example-input search)
or of its own text (``mode: text``). For a request: embed the user input,
score every guideline by cosine similarity (its best trigger), keep those at
or above ``threshold`` in rank order, drop near-duplicates of an already kept
guideline (rapidfuzz ratio >= ``dedup``), keep ``top_k``, and inject them
verbatim and deterministically: chat gets them in the system message
(appended to an existing one), completions get a prefix block. When nothing
passes, the library's fallback guidelines are used (none by default).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field, ValidationError
from rapidfuzz import fuzz

from decoding.base import MethodParams, PromptInput
from decoding.stages import Services
from models.embedder import SentenceEmbedder
from models.errors import InvalidRequestError

DEFAULT_LIBRARY = Path(__file__).parent / "libraries" / "default.jsonl"
HEADER = "Follow these guidelines in your answer:"


class GuidelinesParams(MethodParams):
    """``alignment.guidelines``: retrieve the guidelines nearest the prompt and put them in it."""

    library: str = Field(default="default", description="Which configured library to retrieve from.")
    top_k: int = Field(default=4, ge=1, le=16, description="At most this many guidelines are injected.")
    threshold: float = Field(default=0.3, ge=-1, le=1, description="Minimum cosine similarity.")
    dedup: float = Field(default=0.5, gt=0, le=1, description="Fuzzy ratio at which a guideline is a duplicate.")
    mode: Literal["trigger", "text"] = "trigger"


class Guideline(BaseModel):
    """One library entry."""

    id: str = Field(min_length=1)
    title: str = Field(min_length=1)
    text: str = Field(min_length=1)
    category: str = Field(min_length=1)
    triggers: list[str] = Field(default_factory=list)


class RetrievedGuideline(BaseModel):
    id: str
    title: str
    category: str
    score: float | None = Field(description="Cosine similarity; null for a fallback guideline.")


class GuidelinesDetails(BaseModel):
    """What retrieval did for one request."""

    library: str
    guidelines: list[RetrievedGuideline]
    fallback: bool = Field(description="True when nothing passed the threshold and the fallback was used.")


@dataclass(frozen=True, slots=True)
class Retrieval:
    guidelines: list[tuple[Guideline, float | None]]
    fallback: bool


class GuidelineLibrary:
    """A loaded, indexed library.

    Args:
        name: the name requests use in ``library``.
        guidelines: the entries, in file order (ties in similarity keep this order).
        embedder: embeds queries and the library.
        fallback_ids: guidelines injected when nothing passes the threshold.
    """

    def __init__(
        self,
        name: str,
        guidelines: Sequence[Guideline],
        embedder: SentenceEmbedder,
        *,
        fallback_ids: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.guidelines = list(guidelines)
        by_id = {g.id: g for g in self.guidelines}
        if len(by_id) != len(self.guidelines):
            raise ValueError(f"library `{name}`: guideline ids must be unique")
        unknown = [i for i in fallback_ids if i not in by_id]
        if unknown:
            raise ValueError(f"library `{name}`: fallback ids not in the library: {unknown}")
        self.fallback = [by_id[i] for i in fallback_ids]
        self._embedder = embedder
        self.text_vectors = embedder.embed_corpus([_as_text(g) for g in self.guidelines])
        triggers = [(row, trigger) for row, g in enumerate(self.guidelines) for trigger in g.triggers]
        self.trigger_owner = np.array([row for row, _ in triggers], dtype=np.int64)
        self.trigger_vectors = embedder.embed_corpus([trigger for _, trigger in triggers])

    @classmethod
    def load(cls, name: str, path: Path, embedder: SentenceEmbedder, *, fallback_ids: Sequence[str] = ()):
        return cls(name, read_library(path), embedder, fallback_ids=fallback_ids)

    def similarities(self, query: str, mode: Literal["trigger", "text"]) -> np.ndarray:
        """Cosine similarity of ``query`` to each guideline (its best trigger in ``trigger`` mode)."""
        vector = self._embedder.embed([query])[0]
        if mode == "text" or not len(self.trigger_vectors):
            return self.text_vectors @ vector
        scores = np.full(len(self.guidelines), -np.inf, dtype=np.float32)
        np.maximum.at(scores, self.trigger_owner, self.trigger_vectors @ vector)
        return scores

    def retrieve(self, query: str, params: GuidelinesParams) -> Retrieval:
        scores = self.similarities(query, params.mode)
        # Stable sort: equal scores keep library order, so the result is deterministic.
        order = np.argsort(-scores, kind="stable")
        kept: list[tuple[Guideline, float | None]] = []
        for row in order:
            score = float(scores[row])
            if score < params.threshold or len(kept) == params.top_k:
                break
            guideline = self.guidelines[row]
            if any(fuzz.ratio(guideline.text, other.text) / 100 >= params.dedup for other, _ in kept):
                continue
            kept.append((guideline, score))
        if kept:
            return Retrieval(kept, fallback=False)
        return Retrieval([(g, None) for g in self.fallback[: params.top_k]], fallback=True)


def read_library(path: Path) -> list[Guideline]:
    guidelines = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            guidelines.append(Guideline.model_validate(json.loads(line)))
        except (ValueError, ValidationError) as exc:
            raise ValueError(f"{path}:{number}: not a guideline: {exc}") from exc
    return guidelines


def _as_text(guideline: Guideline) -> str:
    return f"{guideline.title}. {guideline.text}"


def guideline_block(guidelines: Sequence[Guideline]) -> str:
    """The injected text: a header and one numbered line per guideline, texts verbatim."""
    lines = [f"{i}. {g.title}: {g.text}" for i, g in enumerate(guidelines, start=1)]
    return "\n".join([HEADER, *lines])


def inject(prompt: PromptInput, guidelines: Sequence[Guideline]) -> PromptInput:
    """Chat: into the system message (appended to an existing one); completions: a prefix block."""
    if not guidelines:
        return prompt
    block = guideline_block(guidelines)
    if prompt.messages is not None:
        messages = [dict(m) for m in prompt.messages]
        if messages and messages[0]["role"] == "system":
            messages[0]["content"] = f"{messages[0]['content']}\n\n{block}"
        else:
            messages.insert(0, {"role": "system", "content": block})
        return PromptInput(messages=messages)
    return PromptInput(text=f"{block}\n\n{_text_of(prompt)}")


def _text_of(prompt: PromptInput) -> str:
    if prompt.text is None:
        raise InvalidRequestError(
            "Guidelines need a text prompt; token-id prompts cannot be rewritten.", param="alignment.guidelines"
        )
    return prompt.text


class GuidelineRetriever:
    """The prompt stage: retrieve from the chosen library and rewrite the prompt."""

    def __init__(self, libraries: dict[str, GuidelineLibrary]) -> None:
        self.libraries = libraries

    def library(self, name: str) -> GuidelineLibrary:
        if name not in self.libraries:
            available = ", ".join(sorted(self.libraries)) or "none"
            raise InvalidRequestError(
                f"`{name}` is not a configured guideline library (available: {available}).",
                param="alignment.guidelines.library",
            )
        return self.libraries[name]

    def apply(self, prompt: PromptInput, params: GuidelinesParams) -> tuple[PromptInput, GuidelinesDetails]:
        library = self.library(params.library)
        query = prompt.query if prompt.messages is not None else _text_of(prompt)
        retrieval = library.retrieve(query, params)
        chosen = [g for g, _ in retrieval.guidelines]
        details = GuidelinesDetails(
            library=library.name,
            guidelines=[
                RetrievedGuideline(
                    id=g.id, title=g.title, category=g.category, score=None if s is None else round(s, 4)
                )
                for g, s in retrieval.guidelines
            ],
            fallback=retrieval.fallback,
        )
        return inject(prompt, chosen), details


class GuidelinesStage:
    """Guideline retrieval as the pipeline's prompt stage, over the server's ``GuidelineRetriever``."""

    def rewrite(
        self, params: GuidelinesParams, prompt: PromptInput, services: Services
    ) -> tuple[PromptInput, GuidelinesDetails]:
        return services.get(GuidelineRetriever).apply(prompt, params)
