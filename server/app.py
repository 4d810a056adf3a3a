"""``build_app(settings)``: the gateway, with its state on ``app.state``."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
from collections.abc import AsyncIterator

from fastapi import FastAPI

from decoding.grammar import GrammarService
from decoding.grammar.snapshots import TrieSnapshots
from decoding.guidelines import GuidelineRetriever
from decoding.pipeline import Pipeline
from decoding.stages import Services
from server.admission import AdmissionController
from server.auth import AuthMiddleware
from server.config import Settings
from server.drain import Drain, DrainMiddleware
from server.engines import ModelRegistry
from server.errors import install_error_handlers
from server.keystore import key_store
from server.metrics import Metrics
from server.middleware import BodyLimitsMiddleware, RequestContextMiddleware
from server.playground import serve_playground
from server.quotas import Quotas
from server.routes import admin_router, openai_router, ops_router, usage_router
from server.serving_chat import ChatCompletionHandler
from server.serving_completion import CompletionHandler
from server.serving_rewards import RewardsHandler
from server.tracing import TracingMiddleware, configure_tracing
from server.usage import usage_store

SETTINGS_ENV = "_ALIGND_PROCESS_SETTINGS"
"""Where ``alignd serve`` leaves the settings for the gateway processes it starts (``processes`` > 1)."""
logger = logging.getLogger(__name__)


def app_from_environment() -> FastAPI:
    """The app of one of several gateway processes: uvicorn starts each process with this factory."""
    return build_app(Settings.model_validate_json(os.environ[SETTINGS_ENV]))


def build_app(settings: Settings) -> FastAPI:
    registry = ModelRegistry(settings)
    metrics = Metrics()
    tracing = configure_tracing(settings.tracing)

    async def load() -> None:
        await registry.load()
        if snapshots is not None:
            await snapshots.load()
        # The model libraries leave about half a million long-lived objects; under load the collector's full
        # passes over them stalled the gateway for ~250 ms every few seconds. Frozen, it skips them.
        gc.collect()
        gc.freeze()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # One process loads in the background, so /health answers while large models load. One of several
        # loads first: uvicorn accepts on the shared socket only after start-up, so a connection never reaches
        # a process whose models are not loaded while another's are.
        drain.install()
        loading = asyncio.create_task(load())
        if settings.processes > 1:
            await loading
        writing = asyncio.create_task(snapshots.keep_writing()) if snapshots is not None else None
        try:
            yield
        finally:
            for task in (writing, loading):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            if snapshots is not None:
                await snapshots.save()
            await registry.close()
            await usage.close()
            if keys is not None:
                await keys.close()
            if tracing is not None:
                tracing.shutdown()  # exports the spans still batched

    app = FastAPI(title="alignd", lifespan=lifespan)
    app.state.settings = settings
    app.state.registry = registry
    app.state.metrics = metrics
    app.state.admission = AdmissionController(settings.admission, metrics)
    app.state.drain = drain = Drain(settings.drain_timeout_s)
    metrics.admission_limits.labels(limit="request_work").set(settings.limits.max_request_work)
    limits = settings.limits
    grammars = GrammarService(max_grammar_bytes=limits.max_grammar_bytes, max_trie_nodes=limits.max_trie_nodes)
    snapshots, tries = None, settings.tries
    if tries.snapshot is not None:
        # A trie is in its model's token ids: it is kept only for a model served with the same tokenizer.
        snapshots = TrieSnapshots(grammars.store, tries.snapshot, tries.snapshot_interval_s, registry.tokenizer_ids)
    app.state.grammars = grammars
    pipeline = Pipeline(registry, limits, Services(GuidelineRetriever(registry.libraries), grammars))
    handler_args = (registry, pipeline, limits, metrics)
    app.state.completion_handler = CompletionHandler(*handler_args)
    app.state.chat_handler = ChatCompletionHandler(*handler_args)
    app.state.rewards_handler = RewardsHandler(registry, limits)
    app.include_router(openai_router)
    app.include_router(ops_router)
    app.include_router(admin_router)
    if settings.playground:
        serve_playground(app)
    install_error_handlers(app)
    app.add_middleware(BodyLimitsMiddleware, max_bytes=limits.max_body_bytes, read_timeout_s=settings.read_timeout_s)
    app.state.quotas = quotas = Quotas(settings.auth, settings.state)
    app.state.usage = usage = usage_store(settings.state, settings.auth.usage_ledger)
    keys = key_store(settings) if settings.auth.enabled else None
    if settings.auth.enabled:
        app.include_router(usage_router)
        app.add_middleware(AuthMiddleware, auth=settings.auth, quotas=quotas, usage=usage, metrics=metrics,
                           store=keys)  # fmt: skip
    else:
        logger.warning("API keys are off: anyone who reaches this port can use every model (see `auth`)")
    app.add_middleware(DrainMiddleware, drain=drain)
    app.add_middleware(TracingMiddleware)  # inside the request's context: its spans carry the request id
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    return app
