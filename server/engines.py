"""The served models: built from configuration, loaded in the background, looked up by name."""

from __future__ import annotations

import asyncio
import logging

from models.engine import Engine
from models.errors import EngineUnavailableError, ModelNotFoundError
from server.config import LimitsConfig, ModelConfig

logger = logging.getLogger(__name__)


def build_engine(config: ModelConfig, limits: LimitsConfig) -> Engine:
    """Loads one configured model (blocking: call it off the event loop)."""
    from models.hf import HFEngine

    return HFEngine(
        config.name,
        config.path,
        dtype=config.dtype,
        device=config.device,
        max_model_len=config.max_model_len,
        max_logprobs=limits.max_logprobs,
        workers=config.workers,
    )


class ModelRegistry:
    """Engines by model name. ``/health`` is up while they load; ``/ready`` once they have."""

    def __init__(self, configs: list[ModelConfig], limits: LimitsConfig) -> None:
        self._configs = configs
        self._limits = limits
        self._engines: dict[str, Engine] = {}
        self.load_error: str | None = None

    @property
    def ready(self) -> bool:
        return len(self._engines) == len(self._configs)

    @property
    def engines(self) -> dict[str, Engine]:
        return dict(self._engines)

    def get(self, name: str) -> Engine:
        if name in self._engines:
            return self._engines[name]
        if not any(config.name == name for config in self._configs):
            raise ModelNotFoundError(name)
        if self.load_error is not None:
            raise EngineUnavailableError(f"Models failed to load: {self.load_error}")
        raise EngineUnavailableError(f"The model `{name}` is still loading; retry shortly.")

    async def load(self) -> None:
        for config in self._configs:
            try:
                self._engines[config.name] = await asyncio.to_thread(build_engine, config, self._limits)
            except Exception as exc:
                self.load_error = f"{config.name}: {exc}"
                logger.exception("model failed to load", extra={"model": config.name})
                return
            logger.info("model loaded", extra={"model": config.name, "path": str(config.path)})

    async def close(self) -> None:
        for engine in self._engines.values():
            await engine.close()
        self._engines.clear()
