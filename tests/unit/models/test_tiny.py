import hashlib
import json
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer

from models.tiny import TINY_MODEL_NAMES, ensure_tiny_models, make_tiny_models, tiny_models_ready
from models.tokenizer import vocabulary_fingerprint


def digest(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def test_builds_are_deterministic(tiny_models: Path, tmp_path: Path):
    again = make_tiny_models(tmp_path / "again")
    assert digest(again) == digest(tiny_models)


def test_shapes_serve_on_vllm_cpu(tiny_models: Path):
    for name in TINY_MODEL_NAMES:
        config = AutoConfig.from_pretrained(tiny_models / name)
        assert config.hidden_size // config.num_attention_heads == 64, name
        assert sum(f.stat().st_size for f in (tiny_models / name).iterdir()) < 8 * 2**20


def test_tokenizers_are_shared_or_different_as_documented(tiny_models: Path):
    tokenizers = {name: AutoTokenizer.from_pretrained(tiny_models / name) for name in TINY_MODEL_NAMES}
    fingerprints = {name: vocabulary_fingerprint(tokenizer) for name, tokenizer in tokenizers.items()}
    assert fingerprints["chat-shared"] == fingerprints["base"] == fingerprints["reward"]
    assert fingerprints["chat"] != fingerprints["base"]
    assert tokenizers["base"].chat_template is None
    assert tokenizers["chat"].chat_template and tokenizers["chat-shared"].chat_template


def test_reward_model_is_a_single_score_classifier(tiny_models: Path):
    config = AutoConfig.from_pretrained(tiny_models / "reward")
    assert config.architectures == ["LlamaForSequenceClassification"]
    assert config.num_labels == 1 and config.pad_token_id is not None


def test_ensure_reuses_a_complete_set(tiny_models: Path):
    before = digest(tiny_models)
    assert tiny_models_ready(tiny_models)
    ensure_tiny_models(tiny_models)
    assert digest(tiny_models) == before
    assert json.loads((tiny_models / "base" / "config.json").read_text())["vocab_size"] == 2048
