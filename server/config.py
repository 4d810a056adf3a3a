"""Server configuration: one YAML file, every field overridable from the environment.

Environment variables take precedence over the file: ``ALIGND_PORT=9000``,
``ALIGND_LIMITS__MAX_N=4`` (nested fields joined by ``__``).
"""

from __future__ import annotations

from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from decoding.alignment import parse_alignment
from decoding.base import Limits
from models.errors import InvalidRequestError

EMBEDDED_CONFIG = "embedded.yaml"


class VLLMConfig(BaseModel):
    """How to reach vLLM workers: existing replicas (``urls``) or managed ones (launched here)."""

    model_config = ConfigDict(extra="forbid")

    urls: list[str] = Field(default_factory=list, description="Existing replicas; empty: launch managed workers.")
    served_name: str | None = Field(default=None, description="The model name the workers serve (default: `name`).")
    replicas: int = Field(default=1, ge=1, description="Managed workers to launch.")
    command: list[str] | None = Field(
        default=None, description="Managed: the server command (default: this Python's vLLM OpenAI server)."
    )
    args: list[str] = Field(default_factory=list, description="Managed: extra vLLM command-line arguments.")
    env: dict[str, str] = Field(default_factory=dict, description="Managed: extra environment variables.")
    cpus: list[Annotated[int, Field(ge=0)]] = Field(
        default_factory=list,
        description="Managed: the CPUs the worker's processes run on (Linux, `taskset`); empty: any. On a CPU-only "
        "host leave the gateway a core of its own: vLLM's busy-polling engine on every core delays the wake-ups of "
        "every other process by seconds.",
    )
    grammar_plugin: bool = Field(
        default=True,
        description="Generation workers run alignd's grammar plugin: managed ones are started with it; for `urls`, "
        "say whether they were (`--logits-processors decoding.grammar.vllm_plugin:GrammarLogitsProcessor`).",
    )

    @field_validator("urls")
    @classmethod
    def _strip_slashes(cls, urls: list[str]) -> list[str]:
        return [url.rstrip("/") for url in urls]


class ModelConfig(BaseModel):
    """One served model."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, description="The name clients put in `model`.")
    backend: Literal["hf", "vllm"] = "hf"
    path: Path = Field(
        description="Model directory (vllm: at least its tokenizer files); relative paths resolve against `model_root`."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = Field(default="cpu", description="hf: the torch device.")
    max_model_len: int | None = Field(default=None, ge=1)
    workers: int = Field(default=1, ge=1, description="hf: generations of this model that run at once.")
    vllm: VLLMConfig = Field(default_factory=VLLMConfig)


class RuleConfig(BaseModel):
    """A built-in programmatic reward (see ``models.scorers.RuleScorer``)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["regex", "json", "length"]
    pattern: str | None = Field(default=None, description="regex: 1.0 when the response matches, else 0.0.")
    target: int | None = Field(default=None, ge=1, description="length: the ideal length in characters.")

    @model_validator(mode="after")
    def _complete(self) -> Self:
        if self.kind == "regex" and not self.pattern:
            raise ValueError("a regex rule needs `pattern`")
        if self.kind == "length" and self.target is None:
            raise ValueError("a length rule needs `target`")
        return self


class ScorerConfig(BaseModel):
    """A reward scorer: (prompt, response) pairs -> floats."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    backend: Literal["hf", "vllm", "rule"]
    path: Path | None = Field(default=None, description="hf / vllm: the reward model directory.")
    template: str = Field(default="{prompt}{response}", description="How a pair becomes the reward model's input text.")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    max_model_len: int | None = Field(default=None, ge=1)
    vllm: VLLMConfig = Field(default_factory=VLLMConfig)
    rule: RuleConfig | None = None

    @model_validator(mode="after")
    def _complete(self) -> Self:
        if self.backend == "rule" and self.rule is None:
            raise ValueError(f"scorer `{self.name}`: a rule scorer needs `rule`")
        if self.backend != "rule" and self.path is None:
            raise ValueError(f"scorer `{self.name}`: an {self.backend} scorer needs `path`")
        return self


class WorkersConfig(BaseModel):
    """How the gateway talks to vLLM workers and supervises the ones it launches."""

    model_config = ConfigDict(extra="forbid")

    health_interval_s: float = Field(default=2.0, gt=0, description="Health checks of every replica.")
    health_timeout_s: float = Field(
        default=5.0, gt=0, description="How long one health check waits: a busy CPU worker answers late."
    )
    health_failures: int = Field(
        default=3, ge=1,
        description="Consecutive failed health checks that take a replica out (a call that cannot reach it "
        "takes it out at once): one late answer from a busy worker must not fail every request to it.",
    )  # fmt: skip
    connect_timeout_s: float = Field(default=3.0, gt=0)
    session_header: str | None = Field(
        default="x-session-id", pattern=r"^[A-Za-z0-9-]+$",
        description="Sent on every engine call with its affinity key (the request's id; an ASAp trie's key), so "
        "that a router in front of the workers keeps one request's calls on one replica: vLLM's router "
        "(`--policy consistent_hash` reads `x-session-id`), production-stack's (`--routing-logic session "
        "--session-key` this header). None: not sent.",
    )  # fmt: skip
    request_timeout_s: float = Field(
        default=600.0, gt=0,
        description="How long a worker may stay silent in a call: a whole non-streaming call, or between two "
        "chunks of a stream.",
    )  # fmt: skip
    startup_timeout_s: float = Field(default=600.0, gt=0, description="Managed: until a new worker is healthy.")
    restart_backoff_s: float = Field(default=1.0, gt=0, description="Managed: first restart delay, then doubled.")
    max_restart_backoff_s: float = Field(default=60.0, gt=0)
    log_dir: Path | None = Field(default=None, description="Managed: worker logs (default: a temporary directory).")


class TriesConfig(BaseModel):
    """ASAp's tries on disk, the gateway's in-process ones and those in vLLM workers: what ASAp learned
    survives a restart."""

    model_config = ConfigDict(extra="forbid")

    snapshot: Path | None = Field(
        default=None, description="Where the gateway keeps its tries (gzipped JSON); none: they live in memory only."
    )
    snapshot_interval_s: float = Field(
        default=60.0, gt=0, description="How often they are written (and at exit); managed workers' too."
    )
    worker_snapshots: Path | None = Field(
        default=None,
        description="A directory where each managed vLLM worker with the grammar plugin keeps its tries, one file "
        "per replica (`{model}-{replica}.tries.json.gz`), written every `snapshot_interval_s` and at SIGTERM, read "
        "at start; none: they live in the workers' memory only. Workers given by `urls` do the same when started "
        "with `ALIGND_GRAMMAR_SNAPSHOT=<file>` (one per replica) and `ALIGND_GRAMMAR_SNAPSHOT_INTERVAL_S`.",
    )


class LibraryConfig(BaseModel):
    """A guideline library (JSONL; see decoding/guidelines.py)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    path: Path | None = Field(
        default=None,
        description="The JSONL file; relative paths resolve against `model_root` (default: the library shipped "
        "with alignd).",
    )
    fallback: list[str] = Field(default_factory=list, description="Guideline ids injected when nothing matches.")


class GuidelinesConfig(BaseModel):
    """Guideline retrieval: the embedder and the libraries requests choose from."""

    model_config = ConfigDict(extra="forbid")

    embedder: Path | None = Field(default=None, description="A sentence-transformers model (default: MiniLM-L6).")
    device: str = "cpu"
    cache_dir: Path | None = Field(
        default=Path("~/.cache/alignd/embeddings"), description="Library embeddings are kept here between starts."
    )
    libraries: list[LibraryConfig] = Field(default_factory=lambda: [LibraryConfig(name="default")])


class ProfileConfig(BaseModel):
    """A model alias bound to an alignment object: clients that only set `model` get the pipeline."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    model: str = Field(min_length=1, description="The served model the profile runs on.")
    alignment: dict[str, Any] = Field(default_factory=dict)


class AdmissionConfig(BaseModel):
    """Load shedding per served model: a bounded number of requests in flight, a bounded queue before them."""

    model_config = ConfigDict(extra="forbid")

    max_in_flight_per_model: int = Field(default=64, ge=1, description="Requests served at once, streams included.")
    max_queued_per_model: int = Field(default=256, ge=0, description="Requests waiting for a slot; beyond: 429.")
    queue_timeout_s: float = Field(default=30.0, gt=0, description="Longest wait for a slot; then 429.")


class ApiKeyConfig(BaseModel):
    """One API key: who it is, what it may use, and how much. Only the key's hash is configured."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$", description="Shown in usage, logs and metrics.")
    hash: str = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the key, hex (`alignd keys create`).")
    admin: bool = Field(default=False, description="Sees every key's usage (and `/metrics` when it is guarded).")
    models: list[str] | None = Field(default=None, description="Models and profiles it may use; None: all.")
    methods: list[str] | None = Field(default=None, description="Alignment methods it may use; None: all.")
    requests_per_minute: int | None = Field(default=None, ge=1)
    tokens_per_minute: int | None = Field(
        default=None, ge=1, description="Prompt tokens plus the requested completion budget of every sample."
    )
    work_per_day: int | None = Field(
        default=None, ge=1, description="Compute budget: the work units of admission control (samples x tokens x "
        "models, plus Transfer-Q*'s rollouts and GenARM's candidates), summed over a day.",
    )  # fmt: skip
    max_concurrent: int | None = Field(default=None, ge=1, description="Requests in flight at once.")
    expires_at: datetime | None = Field(default=None, description="After this instant the key is refused.")
    created_at: datetime | None = Field(default=None, description="Set by `alignd keys create` and `rotate`.")


class AuthConfig(BaseModel):
    """API keys (`Authorization: Bearer <key>`); off by default."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    keys: list[ApiKeyConfig] = Field(default_factory=list)
    metrics: Literal["open", "admin"] = Field(default="open", description="`/metrics` open, or for admin keys.")
    failed_attempts_per_minute: int = Field(
        default=20, ge=1, description="Requests with a bad key per client address and minute; then 429."
    )
    store_failure: Literal["closed", "open"] = Field(
        default="closed", description="With the shared store unreachable: refuse (503) or serve without limits."
    )
    usage_ledger: Path | None = Field(
        default=None, description="Without `state.url`: every request's usage appended here, summed at start."
    )
    key_file: Path | None = Field(
        default=None, description="Without `state.url`: the keys `alignd keys create|revoke|rotate` manage (JSON)."
    )

    @model_validator(mode="after")
    def _unique_names(self) -> Self:
        names = [key.name for key in self.keys]
        if len(set(names)) != len(names):
            raise ValueError("`auth.keys` names must be unique")
        return self


class StateConfig(BaseModel):
    """Where rate limits and budgets live: in this process, or in Valkey/Redis, shared by every gateway."""

    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(default=None, pattern=r"^(redis|rediss|valkey|valkeys)://", description="None: in-process.")

    @property
    def redis_url(self) -> str | None:
        """``url`` as a Redis client takes it (Valkey speaks Redis's protocol: one client for both)."""
        if self.url is None:
            return None
        scheme, rest = self.url.split("://", 1)
        return f"{'rediss' if scheme in ('rediss', 'valkeys') else 'redis'}://{rest}"


class TracingConfig(BaseModel):
    """OpenTelemetry traces of every request, exported over OTLP/HTTP; off by default."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    endpoint: str = Field(
        default="http://localhost:4318/v1/traces", description="The collector's OTLP/HTTP traces URL."
    )
    service_name: str = "alignd"
    sample_ratio: float = Field(
        default=1.0, ge=0, le=1, description="Requests traced; a client's sampled `traceparent` is always followed."
    )


class Settings(BaseSettings):
    """Everything the gateway needs to start."""

    model_config = SettingsConfigDict(env_prefix="ALIGND_", env_nested_delimiter="__", extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    keep_alive_s: int = Field(
        default=75,
        ge=1,
        description="How long an idle client connection stays open. Longer than the longest Retry-After (60 s), "
        "so a client that waits as told reuses its connection instead of racing the server's close.",
    )
    read_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="How long a client may take to send a request's head (from connecting, or from its first "
        "byte on a reused connection) and then its body; later is a 408 and the connection closes (slow "
        "clients, slowloris). Connections that send nothing close after it too.",
    )
    drain_timeout_s: float = Field(
        default=30.0,
        ge=0,
        description="On SIGTERM, how long requests in flight (streams included) may take to finish while new ones "
        "get a 503 `shutting_down` and `/ready` fails; then the gateway and its managed workers stop. A second "
        "SIGTERM stops at once.",
    )
    processes: int = Field(
        default=1,
        ge=1,
        description="Gateway processes sharing the port, for when one core is not enough (uvicorn's workers; the "
        "kernel spreads connections). Each process has its own admission slots and in-process models and tries; "
        "metrics are summed over all of them. vLLM models need `urls`: managed workers would be launched per process.",
    )
    playground: bool = Field(
        default=True, description="Serve the playground page at `/playground` (with API keys on, it asks for one)."
    )
    model_root: Path = Field(default=Path("."), description="Base directory for relative model paths.")
    tiny_models: bool = Field(default=False, description="Build the tiny offline models into `model_root` if missing.")
    toy_world: bool = Field(
        default=False, description="Build the toy world into `model_root` if missing or built by other code."
    )
    models: list[ModelConfig] = Field(min_length=1)
    scorers: list[ScorerConfig] = Field(default_factory=list)
    guidelines: GuidelinesConfig = GuidelinesConfig()
    profiles: list[ProfileConfig] = Field(default_factory=list)
    limits: Limits = Limits()
    admission: AdmissionConfig = AdmissionConfig()
    workers: WorkersConfig = WorkersConfig()
    tries: TriesConfig = TriesConfig()
    auth: AuthConfig = AuthConfig()
    state: StateConfig = StateConfig()
    tracing: TracingConfig = TracingConfig()

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
        if self.guidelines.cache_dir is not None:
            self.guidelines.cache_dir = self.guidelines.cache_dir.expanduser()
        if self.tries.snapshot is not None:
            self.tries.snapshot = self.tries.snapshot.expanduser()
        if self.auth.usage_ledger is not None:
            self.auth.usage_ledger = self.auth.usage_ledger.expanduser()
        if self.auth.key_file is not None:
            self.auth.key_file = self.auth.key_file.expanduser()
        if self.tries.worker_snapshots is not None:
            self.tries.worker_snapshots = self.tries.worker_snapshots.expanduser()
        entries: list[ModelConfig | ScorerConfig] = [*self.models, *self.scorers]
        for entry in entries:
            if entry.path is not None:
                entry.path = self.model_root / entry.path.expanduser()
        for library in self.guidelines.libraries:
            if library.path is not None:
                library.path = self.model_root / library.path.expanduser()
        names = [entry.name for entry in [*entries, *self.profiles]]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"model, scorer and profile names must be unique; repeated: {', '.join(duplicates)}")
        managed = [entry.name for entry in entries if entry.backend == "vllm" and not entry.vllm.urls]
        if self.processes > 1 and self.tries.snapshot is not None:
            raise ValueError(
                f"`tries.snapshot` needs `processes: 1`: each of {self.processes} gateway processes learns its own "
                "tries, and they would overwrite one file"
            )
        if self.processes > 1 and managed:
            raise ValueError(
                f"`processes: {self.processes}` needs `vllm.urls` for {', '.join(managed)}: every gateway process "
                "would launch its own managed workers"
            )
        models = {model.name for model in self.models}
        fallbacks = {}
        for profile in self.profiles:
            if profile.model not in models:
                raise ValueError(f"profile `{profile.name}` runs on `{profile.model}`, which is not a served model")
            try:
                abstain = parse_alignment(profile.alignment).methods.get("abstain")
            except InvalidRequestError as exc:
                raise ValueError(f"profile `{profile.name}`: {exc.message}") from exc
            fallbacks[profile.name] = getattr(abstain, "fallback", None)
        for name, fallback in fallbacks.items():
            if fallback is not None and fallback not in models and fallback not in fallbacks:
                raise ValueError(f"profile `{name}` falls back to `{fallback}`, which is not a served model or profile")
            if fallbacks.get(fallback or "") is not None:
                raise ValueError(f"profile `{name}` falls back to `{fallback}`, which falls back itself")
        return self

    @model_validator(mode="after")
    def _keys_when_auth_is_on(self) -> Self:
        if self.auth.enabled and not self.auth.keys and self.state.url is None and self.auth.key_file is None:
            raise ValueError("`auth.enabled` needs keys: `auth.keys`, or a key store (`state.url`, `auth.key_file`)")
        return self

    @classmethod
    def load(cls, path: Path | None = None, **overrides: Any) -> Settings:
        """Reads ``path`` (the embedded default when None); ``overrides`` replace file values."""
        text = Path(path).read_text() if path else resources.files("server").joinpath(EMBEDDED_CONFIG).read_text()
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path or EMBEDDED_CONFIG}: the top level must be a mapping")
        return cls(**{**data, **overrides})
