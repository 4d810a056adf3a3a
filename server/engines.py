"""The served models and scorers: built from configuration, loaded in the background, looked up by name."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from decoding.grammar import VLLM_GRAMMAR_PLUGIN
from decoding.guidelines import DEFAULT_LIBRARY, GuidelineLibrary
from decoding.registry import METHODS
from models.engine import Engine
from models.errors import EngineUnavailableError, InvalidRequestError, ModelNotFoundError
from models.scorers import Scorer
from models.vllm_service import VLLMService
from models.workers import DEFAULT_COMMAND, Supervision, WorkerSpec
from server.config import GuidelinesConfig, ModelConfig, ProfileConfig, ScorerConfig, Settings, VLLMConfig

logger = logging.getLogger(__name__)

T = TypeVar("T")


async def build_engine(config: ModelConfig, settings: Settings) -> Engine:
    """Loads one configured model: in-process, or on vLLM workers (connected or launched)."""
    if config.backend == "hf":
        from models.hf import HFEngine

        return await asyncio.to_thread(
            HFEngine,
            config.name,
            config.path,
            dtype=config.dtype,
            device=config.device,
            max_model_len=config.max_model_len,
            max_logprobs=settings.limits.max_logprobs,
            workers=config.workers,
        )
    from models.tokenizer import Tokenizer
    from models.vllm_engine import VLLMEngine

    tokenizer = await asyncio.to_thread(Tokenizer, config.path, name=config.name)
    generation_args = ["--max-logprobs", str(settings.limits.max_logprobs), "--generation-config", "vllm"]
    if config.vllm.grammar_plugin:
        # Named on the command line as well as by the entry point: only processors named here get
        # their output tokens in sync under async scheduling (the plugin ignores the duplicate).
        generation_args += ["--logits-processors", VLLM_GRAMMAR_PLUGIN]
    service = await start_service(config.name, config.path, config.vllm, settings, generation_args, config)
    return await VLLMEngine.create(
        config.name,
        tokenizer,
        service,
        served_name=config.vllm.served_name or config.name,
        max_logprobs=settings.limits.max_logprobs,
        worker_plugins=frozenset({"grammar"}) if config.vllm.grammar_plugin else frozenset(),
    )


async def build_scorer(config: ScorerConfig, settings: Settings) -> Scorer:
    if config.backend == "rule":
        from models.scorers import RuleScorer

        assert config.rule is not None
        return RuleScorer(config.name, config.rule.kind, pattern=config.rule.pattern, target=config.rule.target)
    assert config.path is not None
    if config.backend == "hf":
        from models.scorers import HFRewardScorer

        return await asyncio.to_thread(
            HFRewardScorer,
            config.name,
            config.path,
            template=config.template,
            dtype=config.dtype,
            device=config.device,
            max_length=config.max_model_len,
        )
    from models.scorers import VLLMRewardScorer

    service = await start_service(config.name, config.path, config.vllm, settings, [], config)
    return VLLMRewardScorer(
        config.name, service, served_name=config.vllm.served_name or config.name, template=config.template
    )


async def start_service(
    name: str,
    path: Path,
    vllm: VLLMConfig,
    settings: Settings,
    role_args: list[str],
    config: ModelConfig | ScorerConfig,
) -> VLLMService:
    """Connects to ``vllm.urls``, or launches ``vllm.replicas`` managed workers for ``path``."""
    workers = settings.workers
    options: dict[str, Any] = {
        "health_interval_s": workers.health_interval_s,
        "health_timeout_s": workers.health_timeout_s,
        "health_failures": workers.health_failures,
        "connect_timeout_s": workers.connect_timeout_s,
        "session_header": workers.session_header,
        "request_timeout_s": workers.request_timeout_s,
    }
    if vllm.urls:
        return await VLLMService.connect(name, vllm.urls, **options)
    args = ["--dtype", config.dtype, *role_args]
    if config.max_model_len is not None:
        args += ["--max-model-len", str(config.max_model_len)]
    spec = WorkerSpec(
        name=name,
        model_path=path,
        served_name=vllm.served_name or name,
        args=(*args, *vllm.args),
        env=vllm.env,
        command=tuple(vllm.command) if vllm.command else DEFAULT_COMMAND,
        cpus=tuple(vllm.cpus),
        trie_snapshots=worker_trie_snapshots(config, settings),
        trie_snapshot_interval_s=settings.tries.snapshot_interval_s,
    )
    supervision = Supervision(
        startup_timeout_s=workers.startup_timeout_s,
        restart_backoff_s=workers.restart_backoff_s,
        max_restart_backoff_s=workers.max_restart_backoff_s,
        health_timeout_s=workers.health_timeout_s,
    )
    return await VLLMService.launch(spec, vllm.replicas, supervision=supervision, log_dir=workers.log_dir, **options)


def worker_trie_snapshots(config: ModelConfig | ScorerConfig, settings: Settings) -> Path | None:
    """Where managed workers keep ASAp tries: only generation workers run the grammar plugin (scorers
    never do, whatever their ``grammar_plugin`` says)."""
    return settings.tries.worker_snapshots if isinstance(config, ModelConfig) and config.vllm.grammar_plugin else None


def build_libraries(config: GuidelinesConfig) -> dict[str, GuidelineLibrary]:
    """Loads the embedder and indexes every library (blocking: call it off the event loop)."""
    from models.embedder import SentenceEmbedder

    if not config.libraries:
        return {}
    embedder = SentenceEmbedder(config.embedder, device=config.device, cache_dir=config.cache_dir)
    return {
        library.name: GuidelineLibrary.load(
            library.name, library.path or DEFAULT_LIBRARY, embedder, fallback_ids=library.fallback
        )
        for library in config.libraries
    }


def _resolve_lazy_imports() -> None:
    """transformers resolves its classes on first use, and that is not thread-safe; the models load
    on several threads at once, so resolve the classes they need first, on one."""
    import transformers

    for name in ("AutoTokenizer", "AutoModelForCausalLM", "AutoModelForSequenceClassification", "AutoConfig"):
        getattr(transformers, name)


def unknown_model(name: str, param: str) -> InvalidRequestError:
    return InvalidRequestError(f"`{name}` is not a served model.", param=param)


def unknown_scorer(name: str, param: str) -> InvalidRequestError:
    return InvalidRequestError(f"`{name}` is not a configured reward scorer.", param=param)


def _strings(value: object) -> set[str]:
    """Every string in a nested structure of mappings and lists."""
    if isinstance(value, str):
        return {value}
    if isinstance(value, Mapping):
        return set().union(*map(_strings, value.values()))
    if isinstance(value, list):
        return set().union(*map(_strings, value))
    return set()


class ModelRegistry:
    """Engines, scorers and guideline libraries by name; the pipeline's ``Resources``.

    ``/health`` is up while they load; ``/ready`` once they have.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._engines: dict[str, Engine] = {}
        self._scorers: dict[str, Scorer] = {}
        self.libraries: dict[str, GuidelineLibrary] = {}
        self._libraries_loaded = False
        self.load_error: str | None = None
        self._profile_uses = self._uses_of_profiles()

    @property
    def ready(self) -> bool:
        settings = self._settings
        return (
            self.load_error is None
            and len(self._engines) == len(settings.models)
            and len(self._scorers) == len(settings.scorers)
            and self._libraries_loaded
        )

    @property
    def engines(self) -> dict[str, Engine]:
        return dict(self._engines)

    def tokenizer_ids(self) -> dict[str, str]:
        """Each loaded model's vocabulary fingerprint (equal ones exchange token ids)."""
        return {name: engine.info.tokenizer_id for name, engine in self._engines.items()}

    def get(self, name: str) -> Engine:
        if name in self._engines:
            return self._engines[name]
        if not any(config.name == name for config in self._settings.models):
            raise ModelNotFoundError(name)
        raise self._unavailable(name)

    def resolve(self, name: str) -> tuple[Engine, ProfileConfig | None]:
        """What a client's ``model`` names: a served model, or a profile and the model it runs on."""
        profile = next((p for p in self._settings.profiles if p.name == name), None)
        return self.get(profile.model if profile else name), profile

    def engine(self, name: str, *, param: str) -> Engine:
        """A model a method refers to (a nudger, a baseline): unknown names are the request's fault."""
        if not any(config.name == name for config in self._settings.models):
            raise unknown_model(name, param)
        return self.get(name)

    def scorer(self, name: str, *, param: str) -> Scorer:
        if name in self._scorers:
            return self._scorers[name]
        if not any(config.name == name for config in self._settings.scorers):
            raise unknown_scorer(name, param)
        raise self._unavailable(name)

    def usable_by(self, allowed: Iterable[str], model: str) -> UsableResources:
        """What a request's methods may use when its API key may use only ``allowed`` models, profiles and
        scorers: those, and everything the profile it names runs (when that profile is allowed)."""
        names = frozenset(allowed)
        return UsableResources(self, names | self._profile_uses.get(model, frozenset()) if model in names else names)

    def _uses_of_profiles(self) -> dict[str, frozenset[str]]:
        """Per profile: its model and every model, scorer and fallback profile its configured alignment names
        (names are unique across the three, so a string in the alignment equal to one is that one)."""
        settings = self._settings
        names = {entry.name for group in (settings.models, settings.scorers, settings.profiles) for entry in group}
        own = {p.name: {p.model, *(_strings(p.alignment) & names)} for p in settings.profiles}
        return {name: frozenset(uses.union(*(own.get(use, set()) for use in uses))) for name, uses in own.items()}

    def _unavailable(self, name: str) -> EngineUnavailableError:
        if self.load_error is not None:
            return EngineUnavailableError(f"Models failed to load: {self.load_error}")
        return EngineUnavailableError(f"`{name}` is still loading; retry shortly.")

    async def load(self) -> None:
        """Loads every model and scorer concurrently (managed workers start in parallel)."""
        settings = self._settings
        await asyncio.to_thread(_resolve_lazy_imports)
        await asyncio.gather(
            *(self._load(c.name, build_engine(c, settings), self._engines) for c in settings.models),
            *(self._load(c.name, build_scorer(c, settings), self._scorers) for c in settings.scorers),
            self._load_libraries(),
        )
        self._check_profiles()

    def _check_profiles(self) -> None:
        """Start-up checks that need loaded models: a model a method pairs with the base (a Transfer-Q*
        baseline, a GenARM reward model) shares its tokenizer."""
        for profile in self._settings.profiles:
            mismatch = self._tokenizer_mismatch(profile)
            if mismatch is not None:
                self.load_error = f"profile `{profile.name}`: {mismatch}"
                logger.error("invalid profile", extra={"profile": profile.name, "reason": self.load_error})

    def _tokenizer_mismatch(self, profile: ProfileConfig) -> str | None:
        base = self._engines.get(profile.model)
        if base is None:
            return None
        for method, spec in METHODS.items():
            for field in spec.params.shares_tokenizer:
                paired = self._engines.get((profile.alignment.get(method) or {}).get(field, ""))
                if paired is not None and paired.info.tokenizer_id != base.info.tokenizer_id:
                    where = f"alignment.{method}.{field}"
                    return f"`{where}` `{paired.info.name}` does not share the tokenizer of `{profile.model}`"
        return None

    async def _load_libraries(self) -> None:
        try:
            self.libraries.update(await asyncio.to_thread(build_libraries, self._settings.guidelines))
        except Exception as exc:
            self.load_error = f"guideline libraries: {exc}"
            logger.exception("guideline libraries failed to load")
            return
        self._libraries_loaded = True
        logger.info("guideline libraries loaded", extra={"libraries": sorted(self.libraries)})

    async def _load(self, name: str, build: Awaitable[T], into: dict[str, T]) -> None:
        try:
            into[name] = await build
        except Exception as exc:
            self.load_error = f"{name}: {exc}"
            logger.exception("model failed to load", extra={"model": name})
            return
        logger.info("model loaded", extra={"model": name})

    def describe(self) -> dict[str, Any]:
        """Per model and scorer: its replicas, where it runs on vLLM workers."""
        entries: dict[str, Any] = {}
        for name, entry in [*self._engines.items(), *self._scorers.items()]:
            service = getattr(entry, "service", None)
            entries[name] = {"replicas": service.describe()} if isinstance(service, VLLMService) else {}
        return entries

    async def close(self) -> None:
        entries: list[Engine | Scorer] = [*self._engines.values(), *self._scorers.values()]
        self._engines.clear()
        self._scorers.clear()
        await asyncio.gather(*(entry.close() for entry in entries), return_exceptions=True)


class UsableResources:
    """The registry as a request sees it whose API key may use some names only: the others are unknown to it,
    refused with the very message an unknown name gets, so the key's holder does not learn they exist."""

    def __init__(self, registry: ModelRegistry, names: frozenset[str]) -> None:
        self.registry = registry
        self.names = names

    def engine(self, name: str, *, param: str) -> Engine:
        if name not in self.names:
            raise unknown_model(name, param)
        return self.registry.engine(name, param=param)

    def scorer(self, name: str, *, param: str) -> Scorer:
        if name not in self.names:
            raise unknown_scorer(name, param)
        return self.registry.scorer(name, param=param)
