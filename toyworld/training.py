"""Training the toy world's models on CPU: tokenizers, causal-LM pretraining, chat fine-tuning, a reward model.

A plain torch loop (AdamW, linear warm-up then cosine decay, gradient clipping) over small Llama
models whose shapes vLLM's CPU backend serves (head_dim 64). Seeded: the same seed gives the same
weights on the same machine and torch version.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import LlamaConfig, PreTrainedModel, PreTrainedTokenizerFast

Progress = Callable[[int], None]
"""Called with the number of optimisation steps just taken."""
PreferenceExample = tuple[list[int], int, list[int], int]
"""A preference pair as token ids: (chosen, where its answer starts, rejected, where its answer starts)."""

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MAX_POSITIONS = 1024


@dataclass(frozen=True, slots=True)
class Shape:
    """A Llama model's size: hidden / 64 heads of dimension 64."""

    layers: int
    hidden: int
    intermediate: int

    def config(self, tokenizer: PreTrainedTokenizerFast, **overrides: Any) -> LlamaConfig:
        from transformers import LlamaConfig

        heads = self.hidden // 64
        return LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=self.hidden, intermediate_size=self.intermediate,
            num_hidden_layers=self.layers, num_attention_heads=heads, num_key_value_heads=heads,
            max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=False, bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **overrides,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Schedule:
    epochs: int
    batch_size: int
    learning_rate: float
    warmup_steps: int = 20


def train_tokenizer(texts: Sequence[str], vocab_size: int, *, eos: str, chat: bool) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts`` (with a ChatML template when ``chat``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    vocabulary = Tokenizer(models.BPE())
    vocabulary.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    vocabulary.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    vocabulary.train_from_iterator(texts, trainer)
    return with_template(vocabulary, eos=eos, chat=chat)


def with_template(vocabulary: Any, *, eos: str, chat: bool) -> PreTrainedTokenizerFast:
    """The same vocabulary as a transformers tokenizer, with its end of sequence and chat template."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=vocabulary, eos_token=eos, pad_token="<|endoftext|>", model_max_length=MAX_POSITIONS
    )
    tokenizer.chat_template = CHAT_TEMPLATE if chat else None
    return tokenizer


def _optimise(
    model: torch.nn.Module,
    batches: Callable[[int], Iterator[torch.Tensor]],
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    schedule: Schedule,
    steps_per_epoch: int,
    progress: Progress,
) -> float:
    """The loop every model shares; returns the mean loss of the last epoch."""
    import torch

    total = schedule.epochs * steps_per_epoch
    optimiser = torch.optim.AdamW(model.parameters(), lr=schedule.learning_rate, weight_decay=0.01)

    def rate(step: int) -> float:
        if step < schedule.warmup_steps:
            return (step + 1) / schedule.warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - schedule.warmup_steps) / max(1, total - schedule.warmup_steps)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, rate)
    model.train()
    losses: list[float] = []
    for epoch in range(schedule.epochs):
        losses = []
        for batch in batches(epoch):
            loss = loss_of(batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimiser.step()
            scheduler.step()
            optimiser.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            progress(1)
    model.eval()
    return sum(losses) / max(len(losses), 1)


def pretrain(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, corpus: Callable[[int], Sequence[str]],
    schedule: Schedule, *, block: int = 128, seed: int, progress: Progress,
) -> float:  # fmt: skip
    """Causal-LM training on documents packed into blocks, each document ending with EOS. ``corpus(epoch)``
    gives each epoch's documents, in a new order: a fact then has other neighbours and positions every
    epoch, so the model learns it, not the block it sat in."""
    import torch

    rng = random.Random(seed)

    def blocks(epoch: int) -> torch.Tensor:
        documents = list(corpus(epoch))
        rng.shuffle(documents)
        ids: list[int] = []
        for document in documents:
            ids += [*tokenizer.encode(document), tokenizer.eos_token_id]
        return torch.tensor(ids[: len(ids) // block * block]).view(-1, block)

    def batches(epoch: int) -> Iterator[torch.Tensor]:
        packed = blocks(epoch)
        for start in range(0, len(packed), schedule.batch_size):
            yield packed[start : start + schedule.batch_size]

    steps = math.ceil(len(blocks(0)) / schedule.batch_size)
    return _optimise(model, batches, lambda batch: model(input_ids=batch, labels=batch).loss, schedule, steps, progress)


def chat_examples(
    tokenizer: PreTrainedTokenizerFast, dialogs: Sequence[Any], *, plain_text: bool = False
) -> list[tuple[list[int], int]]:
    """Each dialog as token ids and where its answer starts (loss is taken on the answer and its end only).
    With ``plain_text``, every other dialog is rendered as a base model's plain-text prompt instead of the chat
    template, so the model also answers, aligned, where a base model is prompted (Transfer-Q*'s baseline)."""
    from decoding.base import plain_text_prompt

    examples = []
    for number, dialog in enumerate(dialogs):
        if plain_text and number % 2:
            prompt = plain_text_prompt(dialog.prompt) + " "
        else:
            prompt = str(tokenizer.apply_chat_template(dialog.prompt, tokenize=False, add_generation_prompt=True))
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        answer_ids = [*tokenizer.encode(dialog.answer, add_special_tokens=False), tokenizer.eos_token_id]
        examples.append((prompt_ids + answer_ids, len(prompt_ids)))
    return examples


def answer_batch(rows: Sequence[tuple[list[int], int]], pad: int) -> torch.Tensor:
    """Rows of (token ids, where the answer starts) padded into one tensor of shape (2, rows, width): the ids,
    and the labels (the answer's ids, -100 elsewhere)."""
    import torch

    width = max(len(ids) for ids, _ in rows)
    batch = torch.full((2, len(rows), width), pad)
    batch[1] = -100
    for row, (ids, start) in enumerate(rows):
        batch[0, row, : len(ids)] = torch.tensor(ids)
        batch[1, row, start : len(ids)] = torch.tensor(ids[start:])
    return batch


def finetune_chat(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, dialogs: Sequence[Any], schedule: Schedule,
    *, seed: int, progress: Progress, plain_text: bool = False,
) -> float:  # fmt: skip
    """Supervised chat training: the assistant's answers, given the rendered conversation."""

    examples = chat_examples(tokenizer, dialogs, plain_text=plain_text)
    rng = random.Random(seed)
    pad = tokenizer.pad_token_id

    def batches(epoch: int) -> Iterator[torch.Tensor]:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for start in range(0, len(order), schedule.batch_size):
            yield answer_batch([examples[i] for i in order[start : start + schedule.batch_size]], pad)

    def loss_of(batch: torch.Tensor) -> torch.Tensor:
        inputs, labels = batch[0], batch[1]
        return model(input_ids=inputs, attention_mask=(labels != -100) | (inputs != pad), labels=labels).loss

    steps = math.ceil(len(examples) / schedule.batch_size)
    return _optimise(model, batches, loss_of, schedule, steps, progress)


def train_reward(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, pairs: Sequence[tuple[str, str]], schedule: Schedule,
    *, seed: int, progress: Progress,
) -> float:  # fmt: skip
    """A Bradley-Terry reward model: ``-log sigmoid(r(chosen) - r(rejected))`` over (chosen, rejected) texts."""
    import torch

    rng = random.Random(seed)
    pad = tokenizer.pad_token_id
    encoded = [(tokenizer.encode(chosen), tokenizer.encode(rejected)) for chosen, rejected in pairs]

    def batches(epoch: int) -> Iterator[torch.Tensor]:
        order = list(range(len(encoded)))
        rng.shuffle(order)
        for start in range(0, len(order), schedule.batch_size):
            texts = [text for i in order[start : start + schedule.batch_size] for text in encoded[i]]
            width = max(len(ids) for ids in texts)
            batch = torch.full((len(texts), width), pad)
            for row, ids in enumerate(texts):
                batch[row, : len(ids)] = torch.tensor(ids)
            yield batch

    def loss_of(batch: torch.Tensor) -> torch.Tensor:
        rewards = model(input_ids=batch, attention_mask=batch != pad).logits[:, 0]
        return -torch.nn.functional.logsigmoid(rewards[0::2] - rewards[1::2]).mean()

    steps = math.ceil(len(encoded) / schedule.batch_size)
    return _optimise(model, batches, loss_of, schedule, steps, progress)


def preference_examples(
    tokenizer: PreTrainedTokenizerFast, triples: Sequence[tuple[str, str, str, int]]
) -> list[PreferenceExample]:
    """(prompt, chosen, rejected, end-of-answer id) as token ids the way a model that continues the prompt
    writes them: each answer tokenised together with its prompt (so the boundary token is the one generation
    produces), then the end-of-answer id."""
    examples = []
    for prompt, chosen, rejected, end in triples:
        start = len(tokenizer.encode(prompt, add_special_tokens=False))
        chosen_ids, rejected_ids = ([*tokenizer.encode(prompt + answer, add_special_tokens=False), end]
                                    for answer in (chosen, rejected))  # fmt: skip
        examples.append((chosen_ids, start, rejected_ids, start))
    return examples


def train_autoregressive_reward(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, examples: Sequence[PreferenceExample],
    schedule: Schedule, *, beta: float, seed: int, progress: Progress,
) -> float:  # fmt: skip
    """GenARM's autoregressive reward model (Xu et al. 2024): ``r(x, y) = beta · Σ_t log π_r(y_t | x, y_<t)``,
    trained with the Bradley-Terry loss ``-log sigmoid(r(x, y_w) - r(x, y_l))``: each token's log-probability is
    then a token-level reward, which decoding adds to the base's logits."""
    import torch

    rng = random.Random(seed)
    pad = tokenizer.pad_token_id

    def batches(epoch: int) -> Iterator[torch.Tensor]:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for first in range(0, len(order), schedule.batch_size):
            yield answer_batch([(ids, start) for i in order[first : first + schedule.batch_size]
                                for ids, start in (examples[i][:2], examples[i][2:])], pad)  # fmt: skip

    def loss_of(batch: torch.Tensor) -> torch.Tensor:
        inputs, labels = batch[0], batch[1]
        logits = model(input_ids=inputs, attention_mask=(labels != -100) | (inputs != pad)).logits[:, :-1]
        targets = labels[:, 1:]
        answer = targets != -100
        token_logprobs = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        rewards = beta * (token_logprobs * answer).sum(dim=-1)
        return -torch.nn.functional.logsigmoid(rewards[0::2] - rewards[1::2]).mean()

    steps = math.ceil(len(examples) / schedule.batch_size)
    return _optimise(model, batches, loss_of, schedule, steps, progress)
