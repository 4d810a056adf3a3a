"""Reward scorers: a batch of (prompt, response) pairs in, one float per pair out.

Backends:

- ``HFRewardScorer``: a sequence-classification model (``num_labels=1``) in-process;
  the score is its raw logit.
- ``VLLMRewardScorer``: the same kind of model on a vLLM pooling worker
  (``POST /pooling`` with ``use_activation: false``: raw scores, no sigmoid).
- ``RuleScorer``: programmatic rewards, no model:
  ``regex`` (1.0 if the response matches ``pattern``, else 0.0),
  ``json`` (1.0 if the response parses as JSON, else 0.0),
  ``length`` (``-|len(response) - target| / target``: 0 at the target, lower away from it).

Model scorers see ``template.format(prompt=..., response=...)`` as their input text.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

from models.errors import UpstreamError
from models.vllm_service import VLLMService

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

ScoredPair = tuple[str, str]
"""(prompt, response)"""

DEFAULT_TEMPLATE = "{prompt}{response}"


class Scorer(Protocol):
    """Scores responses to prompts; higher is better."""

    name: str

    async def score(self, pairs: Sequence[ScoredPair]) -> list[float]: ...

    async def close(self) -> None: ...


def render_pairs(template: str, pairs: Sequence[ScoredPair]) -> list[str]:
    return [template.format(prompt=prompt, response=response) for prompt, response in pairs]


class HFRewardScorer:
    """A transformers sequence-classification reward model, run off the event loop.

    Args:
        name: the scorer name requests refer to.
        path: a ``save_pretrained`` directory with model and tokenizer.
        template: how a pair becomes the input text.
        max_length: inputs are truncated (from the left, keeping the response) to this many tokens.
        batch_size: pairs per forward pass.
    """

    def __init__(
        self,
        name: str,
        path: str | Path,
        *,
        template: str = DEFAULT_TEMPLATE,
        dtype: str = "float32",
        device: str = "cpu",
        max_length: int | None = None,
        batch_size: int = 16,
    ) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.name = name
        self._torch = torch
        self._template = template
        self._batch_size = batch_size
        self._tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(path, truncation_side="left")
        self._model: PreTrainedModel = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=getattr(torch, dtype)
        )
        self._model.eval().to(device)
        if self._model.config.num_labels != 1:
            raise ValueError(f"reward model `{name}` must have num_labels=1, has {self._model.config.num_labels}")
        self._max_length = max_length or int(self._model.config.max_position_embeddings)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"reward-{name}")

    async def score(self, pairs: Sequence[ScoredPair]) -> list[float]:
        texts = render_pairs(self._template, pairs)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._score, texts)

    def _score(self, texts: list[str]) -> list[float]:
        scores: list[float] = []
        for start in range(0, len(texts), self._batch_size):
            batch = self._tokenizer(
                texts[start : start + self._batch_size],
                padding=True,
                truncation=True,
                max_length=self._max_length,
                return_tensors="pt",
            ).to(self._model.device)
            with self._torch.inference_mode():
                logits: torch.Tensor = self._model(**batch).logits
            scores.extend(logits[:, 0].float().tolist())
        return scores

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class VLLMRewardScorer:
    """A reward model on vLLM pooling workers: one batched ``/pooling`` call per ``score``."""

    def __init__(self, name: str, service: VLLMService, *, served_name: str, template: str = DEFAULT_TEMPLATE):
        self.name = name
        self.service = service
        self._served_name = served_name
        self._template = template

    async def score(self, pairs: Sequence[ScoredPair]) -> list[float]:
        if not pairs:
            return []
        body = {"model": self._served_name, "input": render_pairs(self._template, pairs), "use_activation": False}
        response = await self.service.post_json("/pooling", body)
        data = sorted(response.get("data", []), key=lambda item: item["index"])
        if len(data) != len(pairs):
            raise UpstreamError(f"The reward worker returned {len(data)} scores for {len(pairs)} inputs.")
        return [float(_first(item["data"])) for item in data]

    async def close(self) -> None:
        await self.service.close()


class RuleScorer:
    """Built-in programmatic rewards; see the module docstring for each rule."""

    def __init__(
        self,
        name: str,
        kind: Literal["regex", "json", "length"],
        *,
        pattern: str | None = None,
        target: int | None = None,
    ) -> None:
        self.name = name
        self.kind = kind
        if kind == "regex":
            if not pattern:
                raise ValueError("a regex rule needs `pattern`")
            self._pattern = re.compile(pattern)
        if kind == "length" and (target is None or target < 1):
            raise ValueError("a length rule needs a positive `target`")
        self._target = target or 1

    async def score(self, pairs: Sequence[ScoredPair]) -> list[float]:
        return [self._score(response) for _, response in pairs]

    def _score(self, response: str) -> float:
        if self.kind == "regex":
            return 1.0 if self._pattern.search(response) else 0.0
        if self.kind == "json":
            try:
                json.loads(response)
            except ValueError:
                return 0.0
            return 1.0
        return -abs(len(response) - self._target) / self._target

    async def close(self) -> None:
        return None


def _first(value: float | list[float]) -> float:
    """Pooling output of a one-label classifier: a number, or a list holding one."""
    return value[0] if isinstance(value, list) else value
