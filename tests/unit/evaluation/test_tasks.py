"""Task files: validation with line numbers, --skip-bad, and the converters of public formats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from decoding.base import plain_text_prompt
from evaluation.tasks import TaskFileError, load_tasks, plain_text_chat


def write(path: Path, *lines: object) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


GOOD = {"id": "t1", "category": "math", "messages": [{"role": "user", "content": "2+2?"}], "checker": "last_number",
        "reference": "4"}  # fmt: skip


def test_good_tasks_load_as_dicts_with_their_extra_fields(tmp_path: Path):
    loaded = load_tasks(write(tmp_path / "t.jsonl", {**GOOD, "source": "mine"}, "", {"id": "t2", "prompt": "Hi"}))
    assert loaded.tasks == [{**GOOD, "source": "mine"}, {"id": "t2", "category": "default", "prompt": "Hi"}]
    assert loaded.skipped == []


def test_every_bad_line_is_named_with_its_number_and_reason(tmp_path: Path):
    path = write(
        tmp_path / "t.jsonl",
        GOOD,
        "{not json",
        {"id": "t3"},
        {**GOOD, "id": "t4", "checker": "similar"},
        {**GOOD, "id": "t5", "checker": "regex"},
        {**GOOD, "id": "t6", "checker": "contains", "reference": None},
        GOOD,
    )
    with pytest.raises(TaskFileError) as raised:
        load_tasks(path)
    assert raised.value.problems == [
        "line 2: not JSON (Expecting property name enclosed in double quotes at column 2)",
        "line 3: task: a task needs `messages` or `prompt`",
        "line 4: task: unknown checker `similar` (known: contains, exact, json_schema, last_number, refusal, regex)",
        "line 5: task: the checker `regex` needs `pattern`",
        "line 6: task: the checker `contains` needs `reference`",
        "line 7: the id `t1` appears twice",
    ]
    skipped = load_tasks(path, skip_bad=True)
    assert [task["id"] for task in skipped.tasks] == ["t1"] and len(skipped.skipped) == 6


def test_a_file_with_no_good_line_is_refused_even_with_skip_bad(tmp_path: Path):
    with pytest.raises(TaskFileError, match="no tasks"):
        load_tasks(write(tmp_path / "t.jsonl", ""), skip_bad=True)


def test_a_gsm8k_file_becomes_last_number_tasks(tmp_path: Path):
    path = write(tmp_path / "gsm8k.jsonl", {"question": "Tom has 3 apples and buys 4. How many?",
                                            "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
                 {"question": "Bad", "answer": "no final answer"})  # fmt: skip
    with pytest.raises(TaskFileError, match=r"line 2: .*no `#### <number>`"):
        load_tasks(path, format="gsm8k")
    [task] = load_tasks(path, format="gsm8k", skip_bad=True).tasks
    assert task == {"id": "gsm8k-00001", "category": "gsm8k", "checker": "last_number", "reference": "7",
                    "messages": [{"role": "user", "content": "Tom has 3 apples and buys 4. How many?"}],
                    "prompt": "User: Tom has 3 apples and buys 4. How many?\nAssistant:"}  # fmt: skip


def test_a_preference_prompt_file_becomes_reward_only_tasks(tmp_path: Path):
    chat = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]
    path = write(tmp_path / "prompts.jsonl", {"prompt": "Write a haiku."}, {"prompt": chat, "id": "c"})
    assert load_tasks(path, format="prompts").tasks == [
        {"id": "prompt-00001", "category": "prompts", "messages": [{"role": "user", "content": "Write a haiku."}],
         "prompt": "User: Write a haiku.\nAssistant:"},
        {"id": "c", "category": "prompts", "messages": chat, "prompt": "Be kind.\n\nUser: Hi\nAssistant:"},
    ]  # fmt: skip


def test_the_plain_text_chat_is_the_one_the_server_gives_a_base_model():
    chat = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]  # fmt: skip
    assert plain_text_chat(chat) == plain_text_prompt(chat)
