"""Guideline retrieval with the real MiniLM embedder: the properties of METHODS.md §5."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from decoding.base import PromptInput
from decoding.guidelines import (
    DEFAULT_LIBRARY,
    HEADER,
    Guideline,
    GuidelineLibrary,
    GuidelineRetriever,
    GuidelinesParams,
    inject,
    read_library,
)
from models.embedder import SentenceEmbedder
from models.errors import InvalidRequestError

# Paraphrases, not the library's own trigger inputs.
QUERIES = [
    "What's a way to injure a person without anyone finding out?",
    "Lately I feel like there is no point in living anymore",
    "code a function in python that reads ISO 8601 timestamps",
    "I need the street address where this reporter lives",
    "Respond strictly in JSON format",
    "how much advil is safe for a bad headache?",
]


@pytest.fixture(scope="session")
def embedder(embeddings_cache: Path) -> SentenceEmbedder:
    return SentenceEmbedder(cache_dir=embeddings_cache)


@pytest.fixture(scope="session")
def library(embedder: SentenceEmbedder) -> GuidelineLibrary:
    return GuidelineLibrary.load("default", DEFAULT_LIBRARY, embedder, fallback_ids=[])


def test_default_library_is_complete():
    guidelines = read_library(DEFAULT_LIBRARY)
    assert len(guidelines) >= 120
    assert len({g.id for g in guidelines}) == len(guidelines)
    assert all(len(g.triggers) >= 3 for g in guidelines)
    categories = Counter(g.category for g in guidelines)
    for category in ("violence", "self-harm", "privacy", "medical", "legal", "financial", "cyber", "hate",
                     "sexual-content", "misinformation", "jailbreak", "clarity", "honesty", "reasoning", "code",
                     "format"):  # fmt: skip
        assert categories[category] >= 3, category


@pytest.mark.parametrize("query", QUERIES)
@pytest.mark.parametrize("mode", ["trigger", "text"])
def test_retrieval_properties(library: GuidelineLibrary, query: str, mode: str):
    threshold = 0.2 if mode == "trigger" else 0.0  # guideline texts are further from questions than triggers
    params = GuidelinesParams(top_k=4, threshold=threshold, mode=mode)
    retrieval = library.retrieve(query, params)
    ids = [g.id for g, _ in retrieval.guidelines]
    scores = [s for _, s in retrieval.guidelines]
    assert not retrieval.fallback and 1 <= len(ids) <= 4  # at most k
    assert len(set(ids)) == len(ids)  # exactly once
    assert scores == sorted(scores, reverse=True) and min(scores) >= threshold  # rank order, above the threshold
    by_id = {g.id: g for g in library.guidelines}
    assert all(by_id[g.id] == g for g, _ in retrieval.guidelines)  # from the library
    assert library.retrieve(query, params) == retrieval  # deterministic


@pytest.mark.parametrize("query", QUERIES)
def test_brute_force_cosine_agrees_with_the_index(library: GuidelineLibrary, embedder: SentenceEmbedder, query: str):
    vector = embedder.embed([query])[0]
    expected = []
    for guideline in library.guidelines:
        triggers = embedder.embed(guideline.triggers)
        cosines = triggers @ vector / (np.linalg.norm(triggers, axis=1) * np.linalg.norm(vector))
        expected.append(float(cosines.max()))
    assert library.similarities(query, "trigger") == pytest.approx(expected, abs=1e-4)
    top = library.retrieve(query, GuidelinesParams(top_k=1, threshold=-1))
    assert top.guidelines[0][0].id == library.guidelines[int(np.argmax(expected))].id


def test_safety_queries_find_safety_guidelines(library: GuidelineLibrary):
    expected = ["violence", "self-harm", "code", "privacy", "format", "medical"]
    for query, category in zip(QUERIES, expected, strict=True):
        found = library.retrieve(query, GuidelinesParams(top_k=3))
        assert found.guidelines[0][0].category == category, (query, found.guidelines)


def small_library(tmp_path: Path, embedder: SentenceEmbedder, fallback: list[str]) -> GuidelineLibrary:
    entries = [
        {"id": "g-tea", "title": "Tea", "text": "Recommend green tea.", "category": "x",
         "triggers": ["what tea should I drink", "best tea for mornings", "is oolong good"]},
        {"id": "g-tea-2", "title": "Tea again", "text": "Recommend green tea!", "category": "x",
         "triggers": ["which tea is healthiest", "tea for the evening", "herbal or black tea"]},
        {"id": "g-generic", "title": "Be helpful", "text": "Answer clearly and honestly.", "category": "quality",
         "triggers": ["help me", "question", "explain"]},
    ]  # fmt: skip
    path = tmp_path / "lib.jsonl"
    path.write_text("\n".join(json.dumps(entry) for entry in entries))
    return GuidelineLibrary.load("small", path, embedder, fallback_ids=fallback)


def test_near_duplicates_are_dropped(tmp_path: Path, embedder: SentenceEmbedder):
    library = small_library(tmp_path, embedder, [])
    found = library.retrieve("what tea is best", GuidelinesParams(top_k=3, threshold=0.0, dedup=0.8))
    ids = [g.id for g, _ in found.guidelines]
    assert "g-tea" in ids or "g-tea-2" in ids
    assert not {"g-tea", "g-tea-2"} <= set(ids)


def test_below_the_threshold_the_fallback_is_used(tmp_path: Path, embedder: SentenceEmbedder):
    params = GuidelinesParams(top_k=2, threshold=0.95)
    with_fallback = small_library(tmp_path, embedder, ["g-generic"]).retrieve("quantum chromodynamics", params)
    assert with_fallback.fallback and [g.id for g, _ in with_fallback.guidelines] == ["g-generic"]
    without = small_library(tmp_path, embedder, []).retrieve("quantum chromodynamics", params)
    assert without.fallback and without.guidelines == []


def test_injection_is_verbatim_and_deterministic():
    guidelines = [
        Guideline(id="a", title="First", text="Do the first thing.", category="c"),
        Guideline(id="b", title="Second", text="Then the second.", category="c"),
    ]
    chat = PromptInput(messages=[{"role": "system", "content": "You are kind."}, {"role": "user", "content": "Hi"}])
    injected = inject(chat, guidelines)
    assert injected.messages is not None
    system = injected.messages[0]["content"]
    assert system.startswith("You are kind.\n\n" + HEADER)
    assert system.index("Do the first thing.") < system.index("Then the second.")
    assert injected.messages[1:] == chat.messages[1:] and chat.messages[0]["content"] == "You are kind."
    bare = inject(PromptInput(messages=[{"role": "user", "content": "Hi"}]), guidelines)
    assert bare.messages is not None and bare.messages[0]["role"] == "system"
    text = inject(PromptInput(text="Q: hi\nA:"), guidelines)
    assert text.text is not None and text.text.endswith("\n\nQ: hi\nA:") and text.text.startswith(HEADER)
    assert inject(chat, guidelines) == injected
    with pytest.raises(InvalidRequestError):
        inject(PromptInput(token_ids=[1, 2]), guidelines)


def test_unknown_library_is_a_400(library: GuidelineLibrary):
    retriever = GuidelineRetriever({"default": library})
    with pytest.raises(InvalidRequestError) as info:
        retriever.apply(PromptInput(text="x"), GuidelinesParams(library="medical-only"))
    assert info.value.param == "alignment.guidelines.library"
