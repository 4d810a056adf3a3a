"""Server configuration: one YAML file, every field overridable from the environment.

Environment variables take precedence over the file: ``ALIGND_PORT=9000``,
``ALIGND_LIMITS__MAX_N=4`` (nested fields joined by ``__``).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

EMBEDDED_CONFIG = "embedded.yaml"


class ModelConfig(BaseModel):
    """One served model."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, description="The name clients put in `model`.")
    backend: Literal["hf"] = "hf"
    path: Path = Field(description="Model directory; relative paths resolve against `model_root`.")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    max_model_len: int | None = Field(default=None, ge=1)
    workers: int = Field(default=1, ge=1, description="Generations of this model that run at once.")


class LimitsConfig(BaseModel):
    """Bounds on what one request may ask for."""

    model_config = ConfigDict(extra="forbid")

    max_n: int = Field(default=8, ge=1)
    max_logprobs: int = Field(default=20, ge=0)
    default_max_tokens: int = Field(default=256, ge=1, description="Chat `max_tokens` when the client sets none.")


class Settings(BaseSettings):
    """Everything the gateway needs to start."""

    model_config = SettingsConfigDict(env_prefix="ALIGND_", env_nested_delimiter="__", extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    model_root: Path = Field(default=Path("."), description="Base directory for relative model paths.")
    tiny_models: bool = Field(default=False, description="Build the tiny offline models into `model_root` if missing.")
    models: list[ModelConfig] = Field(min_length=1)
    limits: LimitsConfig = LimitsConfig()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The YAML file arrives as init arguments; the environment overrides it.
        return env_settings, init_settings

    @model_validator(mode="after")
    def _resolve_paths(self) -> Self:
        self.model_root = self.model_root.expanduser()
        for model in self.models:
            model.path = self.model_root / model.path.expanduser()
        names = [model.name for model in self.models]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"model names must be unique; repeated: {', '.join(duplicates)}")
        return self

    @classmethod
    def load(cls, path: Path | None = None, **overrides: Any) -> Settings:
        """Reads ``path`` (the embedded default when None); ``overrides`` replace file values."""
        text = Path(path).read_text() if path else resources.files("server").joinpath(EMBEDDED_CONFIG).read_text()
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path or EMBEDDED_CONFIG}: the top level must be a mapping")
        return cls(**{**data, **overrides})
