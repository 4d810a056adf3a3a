"""``alignd make-toy-world DIR``: generate the world, train its models, write everything a server needs.

The directory holds, once complete:

- ``base/`` (no chat template), ``nudger/`` (another tokenizer, a chat template, a quarter of the base's
  size or less), ``baseline/`` (a chat model on the base's tokenizer, for Transfer-Q*), ``reward/``
  (sequence classification, initialised from the base), ``arm/`` (GenARM's autoregressive reward model: a
  causal LM on the base's tokenizer, a quarter of its size, initialised from the baseline);
- ``tasks.jsonl`` (held-out tasks for ``alignd eval``), ``guidelines.jsonl`` (the world's library);
- ``world.json`` (what was built: seed, key, sizes, losses, seconds per model).

A build is keyed by a hash of the seed, this package's source and the library versions that shape the
weights; a directory built with another key is rebuilt. It is built in a staging directory next to
``DIR`` and renamed into place only when complete, so a server never sees half-written weights, and an
interrupted build leaves nothing in ``DIR`` (its staging directory is removed by the next build).
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from toyworld import rules, training, world
from toyworld.training import Schedule, Shape

TOY_WORLD_VERSION = "1"
MODELS = ("base", "nudger", "baseline", "reward", "arm")
_MARKER = ".alignd-toy-world"
_STAGING_PREFIX = ".toy-world-staging-"

BASE = Shape(layers=4, hidden=128, intermediate=512)
CHAT = Shape(layers=3, hidden=64, intermediate=256)
# Fewer epochs and the base answers in the thread format only where it read the answer (it stores facts
# before it can retrieve them after a chat prompt): measured, 50 epochs retrieve 3 of 24, 70 retrieve 24.
BASE_SCHEDULE = Schedule(epochs=64, batch_size=16, learning_rate=5e-3)
CHAT_SCHEDULE = Schedule(epochs=24, batch_size=16, learning_rate=3e-3)
REWARD_SCHEDULE = Schedule(epochs=4, batch_size=16, learning_rate=5e-4)
ARM_SCHEDULE = Schedule(epochs=4, batch_size=16, learning_rate=1e-3)
# The Bradley-Terry temperature of the ARM's reward, beta · log π_r(y | x). Measured on the held-out knowledge
# tasks (GenARM at decoding beta 2, 56 tasks): 0.05 passes 0.80 of them, 0.1 0.70, 1.0 0.59; the base 0.25.
ARM_BETA = 0.05


class ToyWorldError(RuntimeError):
    """The world cannot be built or read where it was asked for (the message says why and what to do)."""


def world_key(seed: int) -> str:
    """What the weights depend on: the seed, the world's code, and the versions of torch and its kin."""
    digest = hashlib.sha256(f"{TOY_WORLD_VERSION}/{seed}".encode())
    for module in (world, rules, training):
        digest.update(Path(module.__file__ or "").read_bytes())
    digest.update(Path(__file__).read_bytes())
    for package in ("torch", "transformers", "tokenizers"):
        digest.update(f"{package}={metadata.version(package)}".encode())
    return digest.hexdigest()[:16]


def toy_world_ready(root: Path, seed: int = 0) -> bool:
    marker = root / _MARKER
    return marker.is_file() and marker.read_text().strip() == world_key(seed)


def ensure_toy_world(root: Path, seed: int = 0, *, progress: bool = True) -> Path:
    """The world in ``root``, built first unless a complete build of this seed and code is there."""
    root = Path(root).expanduser()
    if not toy_world_ready(root, seed):
        make_toy_world(root, seed, progress=progress)
    return root


def make_toy_world(root: Path, seed: int = 0, *, progress: bool = True) -> Path:
    """Builds the world of ``seed`` into ``root`` (replacing what is there); about 6.5 minutes on 2 cores."""
    root = Path(root).expanduser()
    with _writable(root):
        root.parent.mkdir(parents=True, exist_ok=True)
        for stale in root.parent.glob(f"{_STAGING_PREFIX}{root.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)  # an interrupted build's leftovers
        with tempfile.TemporaryDirectory(dir=root.parent, prefix=f"{_STAGING_PREFIX}{root.name}-") as scratch:
            staging = Path(scratch) / "world"
            staging.mkdir()
            report = _build(staging, seed, progress=progress)
            (staging / "world.json").write_text(json.dumps(report, indent=2))
            (staging / _MARKER).write_text(report["key"])
            if root.exists():
                shutil.rmtree(root)
            staging.rename(root)
    return root


@contextmanager
def _writable(root: Path) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise ToyWorldError(f"no space left to build the toy world next to {root}: free some, or pick another "
                                "directory (`model_root`)") from exc  # fmt: skip
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise ToyWorldError(f"cannot write the toy world to {root}: {exc.strerror}; pick a writable directory "
                                "(`model_root`, or `alignd make-toy-world DIR`)") from exc  # fmt: skip
        raise


def _build(out: Path, seed: int, *, progress: bool) -> dict[str, Any]:
    import torch
    from tqdm import tqdm
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification
    from transformers.utils import logging

    logging.disable_progress_bar()  # one bar for the whole build
    torch.manual_seed(seed)
    the_world = world.make_world(seed)
    documents, dialogs, preferences = the_world.documents(), the_world.dialogs(), the_world.preferences()
    base_tokenizer = training.train_tokenizer(documents, 1024, eos="<|endoftext|>", chat=False)
    # Small: names split into syllables, as unseen ones will, so copying a name is one skill, learned once.
    nudger_tokenizer = training.train_tokenizer([_dialog_text(d) for d in dialogs], 384, eos="<|im_end|>", chat=True)
    baseline_tokenizer = training.with_template(base_tokenizer.backend_tokenizer, eos="<|im_end|>", chat=True)
    triples = _preference_triples(preferences, baseline_tokenizer, base_tokenizer.eos_token_id)
    reward_pairs = [(prompt + chosen, prompt + rejected) for prompt, chosen, rejected, _ in triples]
    arm_examples = training.preference_examples(base_tokenizer, triples)
    report: dict[str, Any] = {"seed": seed, "key": world_key(seed), "version": TOY_WORLD_VERSION, "models": {}}
    steps = {
        "base": BASE_SCHEDULE.epochs * _blocks(base_tokenizer, documents, BASE_SCHEDULE),
        "nudger": CHAT_SCHEDULE.epochs * -(-len(dialogs) // CHAT_SCHEDULE.batch_size),
        "baseline": CHAT_SCHEDULE.epochs * -(-len(dialogs) // CHAT_SCHEDULE.batch_size),
        "reward": REWARD_SCHEDULE.epochs * -(-len(reward_pairs) // REWARD_SCHEDULE.batch_size),
        "arm": ARM_SCHEDULE.epochs * -(-len(arm_examples) // ARM_SCHEDULE.batch_size),
    }
    # On a terminal the bar redraws; in a log (CI) it writes a line every 15 s instead of thousands.
    redraw_s = 0.1 if sys.stderr.isatty() else 15.0
    with tqdm(total=sum(steps.values()), desc="toy world", unit="step", disable=not progress,
              mininterval=redraw_s) as bar:  # fmt: skip

        def trained(name: str, model: Any, tokenizer: Any, run: Any) -> None:
            bar.set_postfix_str(name)
            started = time.perf_counter()
            loss = run(model, tokenizer)
            model.save_pretrained(out / name)
            tokenizer.save_pretrained(out / name)
            parameters = sum(p.numel() for p in model.parameters())
            report["models"][name] = {"parameters": parameters, "final_loss": round(loss, 4),
                                      "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip

        def advance(count: int) -> None:
            bar.update(count)

        base = LlamaForCausalLM(BASE.config(base_tokenizer))
        trained("base", base, base_tokenizer, lambda m, t: training.pretrain(
            m, t, the_world.documents, BASE_SCHEDULE, seed=seed, progress=advance))  # fmt: skip
        # The baseline also learns to answer after the base's plain-text prompt: Transfer-Q* rolls it out there.
        chat_models = {}
        for name, tokenizer, plain in (("nudger", nudger_tokenizer, False), ("baseline", baseline_tokenizer, True)):
            torch.manual_seed(seed + len(name))
            chat_models[name] = LlamaForCausalLM(CHAT.config(tokenizer))
            trained(
                name,
                chat_models[name],
                tokenizer,
                lambda m, t, plain=plain: training.finetune_chat(
                    m, t, dialogs, CHAT_SCHEDULE, seed=seed, progress=advance, plain_text=plain
                ),
            )
        reward = LlamaForSequenceClassification(BASE.config(base_tokenizer, num_labels=1))
        reward.model.load_state_dict(base.model.state_dict())  # a reward model starts from the base, as in RLHF
        trained("reward", reward, base_tokenizer, lambda m, t: training.train_reward(
            m, t, reward_pairs, REWARD_SCHEDULE, seed=seed, progress=advance))  # fmt: skip
        # GenARM starts its reward model from an SFT model; it scores the base's own token ids (its tokenizer).
        arm = LlamaForCausalLM(CHAT.config(base_tokenizer))
        arm.load_state_dict(chat_models["baseline"].state_dict())
        trained("arm", arm, base_tokenizer, lambda m, t: training.train_autoregressive_reward(
            m, t, arm_examples, ARM_SCHEDULE, beta=ARM_BETA, seed=seed, progress=advance))  # fmt: skip
    _write_jsonl(out / "tasks.jsonl", the_world.tasks())
    _write_jsonl(out / "guidelines.jsonl", [rule.guideline.model_dump() for rule in the_world.rules])
    return report


def _dialog_text(dialog: world.Dialog) -> str:
    return "\n".join(message["content"] for message in dialog.messages)


def _blocks(tokenizer: Any, documents: list[str], schedule: Schedule, block: int = 128) -> int:
    tokens = sum(len(tokenizer.encode(document)) + 1 for document in documents)
    return -(-(tokens // block) // schedule.batch_size)


def _preference_triples(
    preferences: list[world.Preference], chat: Any, base_eos: int
) -> list[tuple[str, str, str, int]]:
    """Each pair as the reward models see it: (prompt, chosen, rejected, the id that ends an answer there). The
    prompt is the one the base sees (plain text; the answer after a space, ended by the base's EOS) or a chat
    model's (its template; ended by ``<|im_end|>``), in turn."""
    from decoding.base import plain_text_prompt

    triples = []
    for number, preference in enumerate(preferences):
        if number % 2:
            prompt = plain_text_prompt(preference.messages)
            triples.append((prompt, " " + preference.chosen, " " + preference.rejected, base_eos))
        else:
            prompt = chat.apply_chat_template(
                preference.messages, chat_template=training.CHAT_TEMPLATE, tokenize=False, add_generation_prompt=True
            )
            triples.append((prompt, preference.chosen, preference.rejected, chat.eos_token_id))
    return triples


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
