"""Start-up of the model registry on the tiny models."""

from pathlib import Path

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
