"""Building the toy world: never a half-written world, clear errors, a stale build rebuilt.

Training is replaced by a stand-in that writes the files a build writes, so these run in milliseconds;
the real build is exercised by the toy-world tests (``tests/integration/test_toy_world.py``).
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest

from toyworld import build
from toyworld.build import ToyWorldError, ensure_toy_world, make_toy_world, toy_world_ready


class StandIn:
    """Writes a world's files, or fails part-way the way a real build can."""

    def __init__(self, failure: BaseException | None = None) -> None:
        self.failure = failure
        self.builds = 0

    def __call__(self, out: Path, seed: int, *, progress: bool) -> dict[str, Any]:
        self.builds += 1
        for name in build.MODELS:
            (out / name).mkdir()
            (out / name / "config.json").write_text("{}")
        if self.failure is not None:
            raise self.failure
        return {"seed": seed, "key": build.world_key(seed), "models": {}}


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> StandIn:
    builder = StandIn()
    monkeypatch.setattr(build, "_build", builder)
    return builder


def test_a_build_is_complete_and_reused(tmp_path: Path, stand_in: StandIn):
    root = ensure_toy_world(tmp_path / "world", progress=False)
    assert toy_world_ready(root) and (root / "world.json").is_file() and (root / "reward" / "config.json").is_file()
    ensure_toy_world(root, progress=False)
    assert stand_in.builds == 1
    assert not toy_world_ready(root, seed=1)  # another seed is another world


def test_a_world_built_by_other_code_is_rebuilt(tmp_path: Path, stand_in: StandIn):
    root = ensure_toy_world(tmp_path / "world", progress=False)
    (root / ".alignd-toy-world").write_text("a key of another version")
    ensure_toy_world(root, progress=False)
    assert stand_in.builds == 2 and toy_world_ready(root)


@pytest.mark.parametrize("failure", [KeyboardInterrupt(), RuntimeError("the trainer crashed")])
def test_an_interrupted_build_leaves_the_old_world_and_no_half_written_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: BaseException
):
    root = tmp_path / "world"
    monkeypatch.setattr(build, "_build", StandIn())
    make_toy_world(root, progress=False)
    before = sorted(p.name for p in root.iterdir())
    monkeypatch.setattr(build, "_build", StandIn(failure))
    with pytest.raises(type(failure)):
        make_toy_world(root, progress=False)
    assert sorted(p.name for p in root.iterdir()) == before and toy_world_ready(root)
    assert [p.name for p in tmp_path.iterdir()] == ["world"]  # no staging directory left behind


def test_a_killed_builds_leftovers_are_removed_by_the_next(tmp_path: Path, stand_in: StandIn):
    leftover = tmp_path / ".toy-world-staging-world-abc123" / "world" / "base"
    leftover.mkdir(parents=True)
    make_toy_world(tmp_path / "world", progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["world"]


@pytest.mark.parametrize(
    ("code", "message"),
    [(errno.EACCES, "cannot write the toy world"), (errno.EROFS, "cannot write the toy world"),
     (errno.ENOSPC, "no space left")],
)  # fmt: skip
def test_an_unwritable_or_full_directory_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, message: str
):
    def fail(out: Path, seed: int, *, progress: bool) -> dict[str, Any]:
        raise OSError(code, "refused", str(out))

    monkeypatch.setattr(build, "_build", fail)
    with pytest.raises(ToyWorldError, match=message) as info:
        make_toy_world(tmp_path / "world", progress=False)
    assert str(tmp_path / "world") in str(info.value) and not (tmp_path / "world").exists()


def test_the_command_reuses_a_built_world_unless_forced(tmp_path: Path, stand_in: StandIn, capsys: Any):
    from server.cli import main

    assert main(["make-toy-world", str(tmp_path / "world")]) == 0
    assert main(["make-toy-world", str(tmp_path / "world")]) == 0 and stand_in.builds == 1
    assert main(["make-toy-world", "--force", str(tmp_path / "world")]) == 0 and stand_in.builds == 2
    assert capsys.readouterr().out.splitlines() == [str(tmp_path / "world")] * 3


def test_the_command_names_an_unwritable_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any):
    from server.cli import main

    def fail(out: Path, seed: int, *, progress: bool) -> dict[str, Any]:
        raise OSError(errno.EACCES, "Permission denied", str(out))

    monkeypatch.setattr(build, "_build", fail)
    assert main(["make-toy-world", str(tmp_path / "world")]) == 2
    assert "cannot write the toy world" in capsys.readouterr().err
