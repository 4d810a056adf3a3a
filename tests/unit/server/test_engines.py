"""The model registry: start-up on the tiny models, and what a key limited to some names may use."""

from pathlib import Path

import pytest

from models.errors import InvalidRequestError
from server.config import Settings
from server.engines import ModelRegistry


def settings(tiny_models: Path, baseline: str) -> Settings:
    return Settings(
        model_root=tiny_models,
        models=[{"name": "base", "path": "base"}, {"name": "baseline", "path": baseline}],
        scorers=[{"name": "rm", "backend": "rule", "rule": {"kind": "json"}}],
        guidelines={"libraries": []},
        profiles=[
            {"name": "tq", "model": "base", "alignment": {"transfer_q": {"baseline": "baseline", "reward": "rm"}}}
        ],
    )


async def test_a_transfer_q_profile_needs_a_shared_tokenizer(tiny_models: Path):
    shared = ModelRegistry(settings(tiny_models, "chat-shared"))
    await shared.load()
    assert shared.ready and shared.load_error is None
    other = ModelRegistry(settings(tiny_models, "chat"))
    await other.load()
    assert not other.ready and "does not share the tokenizer" in (other.load_error or "")
    await shared.close()
    await other.close()


def test_a_key_limited_to_a_profile_may_use_what_the_profile_and_its_fallback_run():
    registry = ModelRegistry(
        Settings(
            models=[{"name": name, "path": f"/{name}"} for name in ("base", "nudger", "big")],
            scorers=[{"name": "rm", "backend": "rule", "rule": {"kind": "json"}}],
            profiles=[
                {"name": "nudged", "model": "base", "alignment": {"nudging": {"nudger": "nudger"}}},
                {
                    "name": "gated",
                    "model": "base",
                    "alignment": {
                        "abstain": {"threshold": 0.1, "fallback": "nudged"},
                        "best_of_n": {"n": 2, "reward": ["rm"]},
                    },
                },
            ],
        )
    )
    assert registry.usable_by(["gated"], "gated").names == {"gated", "base", "nudged", "nudger", "rm"}
    assert registry.usable_by(["nudged"], "nudged").names == {"nudged", "base", "nudger"}
    assert registry.usable_by(["base"], "nudged").names == {"base"}, "a profile the key may not use adds nothing"
    usable = registry.usable_by(["nudged"], "nudged")
    with pytest.raises(InvalidRequestError, match="`big` is not a served model") as raised:
        usable.engine("big", param="alignment.nudging.nudger")
    assert raised.value.param == "alignment.nudging.nudger"
    with pytest.raises(InvalidRequestError, match="`rm` is not a configured reward scorer"):
        usable.scorer("rm", param="alignment.best_of_n.reward")
