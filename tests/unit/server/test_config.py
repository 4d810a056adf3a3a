from pathlib import Path

import pytest
from pydantic import ValidationError

from server.config import Settings


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "alignd.yaml"
    path.write_text(text)
    return path


def test_yaml_with_relative_paths(tmp_path: Path):
    settings = Settings.load(write(tmp_path, f"model_root: {tmp_path}\nmodels:\n  - {{name: a, path: base}}\n"))
    assert settings.models[0].path == tmp_path / "base"
    assert settings.limits.max_n == 8


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("ALIGND_PORT", "9001")
    monkeypatch.setenv("ALIGND_LIMITS__MAX_N", "3")
    settings = Settings.load(write(tmp_path, "port: 8000\nmodels:\n  - {name: a, path: /m}\nlimits: {max_n: 5}\n"))
    assert settings.port == 9001
    assert settings.limits.max_n == 3


def test_embedded_default_serves_the_toy_world():
    settings = Settings.load()
    assert settings.toy_world and not settings.tiny_models
    assert [model.name for model in settings.models] == ["toy-base", "toy-nudger", "toy-baseline", "toy-arm"]
    assert all(model.path.parent == settings.model_root for model in settings.models)
    assert {scorer.name for scorer in settings.scorers} == {"toy-rm", "is-json"}
    assert settings.guidelines.libraries[0].path == settings.model_root / "guidelines.jsonl"
    profiles = {profile.name for profile in settings.profiles}
    assert profiles == {
        "toy-nudged",
        "toy-best-of-8",
        "toy-transfer-q",
        "toy-genarm",
        "toy-guided",
        "toy-chat-best-of-8",
        "toy-honest",
    }


def test_the_tiny_models_config_serves_the_tiny_models():
    settings = Settings.load(Path(__file__).parents[3] / "deploy" / "tiny-models.yaml")
    assert settings.tiny_models
    assert [model.name for model in settings.models] == ["tiny-base", "tiny-chat", "tiny-chat-shared"]
    assert {scorer.name for scorer in settings.scorers} == {"rm", "is-json"}


@pytest.mark.parametrize(
    "text",
    [
        "models: []\n",
        "models:\n  - {name: a, path: /m}\n  - {name: a, path: /n}\n",
        "models:\n  - {name: a, path: /m, colour: red}\n",
        "models:\n  - {name: a, path: /m}\nlimits: {max_n: 0}\n",
        "models:\n  - {name: a, path: /m}\nprofiles:\n  - {name: p, model: b}\n",
        "models:\n  - {name: a, path: /m}\nprofiles:\n  - {name: p, model: a, alignment: {best_of_n: {n: 0}}}\n",
        "models:\n  - {name: a, path: /m}\nprofiles:\n  - {name: a, model: a}\n",
        "models:\n  - {name: a, path: /m}\nprofiles:\n  - {name: p, model: a, alignment: {abstain: {threshold: 1, "
        "fallback: nope}}}\n",
        "models:\n  - {name: a, path: /m}\nprofiles:\n  - {name: p, model: a, alignment: {abstain: {threshold: 1, "
        "fallback: q}}}\n  - {name: q, model: a, alignment: {abstain: {threshold: 1, fallback: a}}}\n",
    ],
)
def test_invalid_files_are_rejected(tmp_path: Path, text: str):
    with pytest.raises(ValidationError):
        Settings.load(write(tmp_path, text))


def test_a_profile_may_fall_back_to_a_model_or_a_profile(tmp_path: Path):
    text = ("models:\n  - {name: a, path: /m}\nprofiles:\n  - {name: p, model: a, alignment: {abstain: {threshold: 1, "
            "fallback: q}}}\n  - {name: q, model: a}\n  - {name: r, model: a, alignment: {abstain: {threshold: 1, "
            "fallback: a}}}\n")  # fmt: skip
    assert [profile.name for profile in Settings.load(write(tmp_path, text)).profiles] == ["p", "q", "r"]


def test_several_processes_need_vllm_models_by_url(tmp_path: Path):
    managed = "processes: 2\nmodels:\n  - {name: a, backend: vllm, path: /m}\n  - {name: b, path: /m}\n"
    with pytest.raises(ValidationError, match=r"`processes: 2` needs `vllm.urls` for a"):
        Settings.load(write(tmp_path, managed))
    remote = "processes: 2\nmodels:\n  - {name: a, backend: vllm, path: /m, vllm: {urls: ['http://w:8000']}}\n"
    assert Settings.load(write(tmp_path, remote)).processes == 2


def test_settings_reach_every_process_unchanged():
    """``alignd serve`` hands the settings to its gateway processes as JSON."""
    settings = Settings.load(processes=2)
    assert Settings.model_validate_json(settings.model_dump_json()) == settings
