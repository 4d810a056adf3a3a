"""Session-wide fixtures: the tiny offline models, built once per test run."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.tiny import make_tiny_models


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_models(tmp_path_factory.mktemp("tiny") / "models")


@pytest.fixture(scope="session")
def embeddings_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One embedding cache for the run: the default library is embedded once, not per server."""
    return tmp_path_factory.mktemp("embeddings")
