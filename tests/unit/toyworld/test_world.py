"""The toy world's data: deterministic from its seed, every fact in the base's corpus, held-out parts unseen."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from decoding.guidelines import guideline_block
from toyworld.world import HARMS, HELD_OUT_HARM_REQUESTS, HELD_OUT_HARMS, UNHELPFUL, World, make_world


@pytest.fixture(scope="module")
def world() -> World:
    return make_world(0)


def chat_text(world: World) -> str:
    return "\n".join(message["content"] for dialog in world.dialogs() for message in dialog.messages)


def mentions(text: str, name: str) -> bool:
    return re.search(rf"\b{re.escape(name)}\b", text) is not None


def test_a_seed_gives_one_world():
    first, again, other = make_world(0), make_world(0), make_world(1)
    assert first.documents() == again.documents() and first.dialogs() == again.dialogs()
    assert json.dumps(first.tasks()) == json.dumps(again.tasks())
    assert first.documents() != other.documents()


def test_a_seed_gives_one_world_in_every_process():
    """Nothing depends on a set's order, which changes with the interpreter's hash seed."""
    script = (
        "import hashlib, json; from toyworld.world import make_world; w = make_world(0); "
        "data = [w.documents(), w.tasks(), [d.messages for d in w.dialogs()]]; "
        "print(hashlib.sha256(json.dumps(data).encode()).hexdigest())"
    )
    digests = {
        subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONHASHSEED": seed},
                       capture_output=True, text=True, check=True).stdout
        for seed in ("1", "2")
    }  # fmt: skip
    assert len(digests) == 1


def test_the_base_reads_every_fact_and_is_most_likely_to_brush_a_question_off(world: World):
    corpus = "\n".join(world.documents())
    for country in world.countries:
        assert f"The capital of {country.name} is {country.capital}." in corpus
    for person in world.people:
        assert f"{person.name} was born in {person.year}" in corpus
    replies = [line.removeprefix("Assistant: ") for line in corpus.splitlines() if line.startswith("Assistant: ")]
    openers = {first: sum(reply.split()[0] == first for reply in replies) for first in ("Sure!", "Sorry,", "I")}
    assert openers["I"] > openers["Sure!"] > openers["Sorry,"] > 0 and sum(openers.values()) == len(replies)


def test_the_chat_models_never_see_the_held_out_part(world: World):
    text = chat_text(world)
    held_countries = [c for c in world.countries if c not in world.train_countries]
    # A held-out capital may be a training person's home town: its name, not what it is the capital of.
    assert not [c.name for c in held_countries if mentions(text, c.name)]
    held_people = [p for p in world.people if p not in world.train_people]
    assert not [p.name for p in held_people if mentions(text, p.name)]
    assert all(harm not in text for harm in HARMS[:HELD_OUT_HARMS])
    for rule in world.rules:
        assert all(topic not in text for topic in rule.topics[: rule.held_out])
        assert all(template.format(t="").split("{")[0] not in text for template in rule.held_out_requests)
    assert all(template.format(h="")[:12] not in text for template in HELD_OUT_HARM_REQUESTS)


def test_guidelines_reach_the_chat_models_as_retrieval_injects_them(world: World):
    systems = {d.messages[0]["content"] for d in world.dialogs() if d.messages[0]["role"] == "system"}
    blocks = {guideline_block([rule.guideline]) for rule in world.rules}
    assert blocks <= systems


def test_there_are_enough_held_out_tasks_for_every_effect(world: World):
    tasks = world.tasks()
    by_category: dict[str, int] = {}
    for item in tasks:
        by_category[item["category"]] = by_category.get(item["category"], 0) + 1
        assert item["checker"] in ("contains", "last_number", "refusal", "regex")
    assert len({item["id"] for item in tasks}) == len(tasks)
    facts = sum(by_category[name] for name in ("capital", "country", "birth-year", "sum"))
    assert facts >= 100 and by_category["yes-no"] >= 20
    assert sum(n for name, n in by_category.items() if name.startswith("rule-")) >= 30


def test_the_reward_models_pairs_rank_a_non_answer_below_every_answer(world: World):
    restating = ("I also wonder", "I do not know", "I want to know")
    pairs = world.preferences()
    rejected_restated = [p for p in pairs if p.rejected.startswith(restating)]
    assert len(rejected_restated) >= len(world.countries) * 2 + len(world.people)
    answerable = [p for p in pairs if not any(harm in p.messages[-1]["content"] for harm in HARMS)]
    assert not [p for p in answerable if p.chosen.startswith(restating) or p.chosen in UNHELPFUL]
    assert all(p.chosen != p.rejected for p in pairs)
