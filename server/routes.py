"""HTTP routes: thin, each takes its handler from ``app.state`` and returns what it gives."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel

from decoding.grammar import GrammarService, TrieSummary
from decoding.usage import UsageMeter
from models.errors import EngineUnavailableError
from server.admission import AdmissionTicket
from server.auth import caller, meter_usage
from server.disconnect import cancel_on_disconnect
from server.drain import ShuttingDownError
from server.engines import ModelRegistry
from server.errors import RouteError, error_payload
from server.metrics import Metrics
from server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    RewardList,
    RewardRequest,
    now,
)
from server.serving_chat import ChatCompletionHandler
from server.serving_completion import CompletionHandler
from server.serving_rewards import RewardsHandler
from server.usage import UsageStore


# Dependencies are async: FastAPI runs a plain `def` in a worker thread, a hop that cost more than the rest of a
# request's routing.
async def _completion_handler(request: Request) -> CompletionHandler:
    return request.app.state.completion_handler


async def _chat_handler(request: Request) -> ChatCompletionHandler:
    return request.app.state.chat_handler


async def _rewards_handler(request: Request) -> RewardsHandler:
    return request.app.state.rewards_handler


async def _registry(request: Request) -> ModelRegistry:
    return request.app.state.registry


async def _metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def _grammars(request: Request) -> GrammarService:
    return request.app.state.grammars


async def _admission_ticket(request: Request) -> AsyncIterator[AdmissionTicket]:
    """The request's admission ticket. FastAPI runs the code after ``yield`` once the response has been
    sent (a stream: its last byte) or the request has failed or been cancelled, so a slot is always freed."""
    ticket = request.app.state.admission.ticket()
    try:
        yield ticket
    finally:
        ticket.release()


CompletionHandlerDep = Annotated[CompletionHandler, Depends(_completion_handler)]
ChatHandlerDep = Annotated[ChatCompletionHandler, Depends(_chat_handler)]
RewardsHandlerDep = Annotated[RewardsHandler, Depends(_rewards_handler)]
RegistryDep = Annotated[ModelRegistry, Depends(_registry)]
MetricsDep = Annotated[Metrics, Depends(_metrics)]
TicketDep = Annotated[AdmissionTicket, Depends(_admission_ticket)]
GrammarsDep = Annotated[GrammarService, Depends(_grammars)]

openai_router = APIRouter(prefix="/v1")
ops_router = APIRouter()
admin_router = APIRouter(prefix="/admin", tags=["admin"])
usage_router = APIRouter(prefix="/v1")
"""Usage is counted per API key: served with `auth.enabled` only."""


@openai_router.get("/models")
async def list_models(request: Request, registry: RegistryDep) -> ModelList:
    """Served models, then profiles (aliases that run a model with an alignment pipeline)."""
    created = now()
    engines = registry.engines
    cards = [ModelCard(id=name, created=created, max_model_len=e.info.max_model_len) for name, e in engines.items()]
    for profile in request.app.state.settings.profiles:
        if profile.model in engines:
            limit = engines[profile.model].info.max_model_len
            cards.append(ModelCard(id=profile.name, created=created, max_model_len=limit, root=profile.model))
    key = caller(request)
    if key is not None and key.models is not None:  # what a key may not use, it is not shown
        cards = [card for card in cards if card.id in key.models]
    return ModelList(data=cards)


class UsageReport(BaseModel):
    object: Literal["usage"] = "usage"
    keys: dict[str, dict[str, dict[str, int]]]
    """Key name -> model -> requests, status_<code>, prompt_tokens, completion_tokens, engine_calls, reward_calls,
    work."""


@usage_router.get("/usage")
async def usage(request: Request) -> UsageReport:
    """The caller's key's usage by model; an admin key sees every key's."""
    key = caller(request)
    assert key is not None  # the route is served with API keys on only
    store: UsageStore = request.app.state.usage
    return UsageReport(keys=await store.totals(None if key.admin else key.name))


@openai_router.post("/completions", response_model=None)
async def create_completion(
    body: CompletionRequest, request: Request, handler: CompletionHandlerDep, ticket: TicketDep
) -> Any:
    return await cancel_on_disconnect(request, handler.create(body, request, ticket))


@openai_router.post("/chat/completions", response_model=None)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, handler: ChatHandlerDep, ticket: TicketDep
) -> Any:
    return await cancel_on_disconnect(request, handler.create(body, request, ticket))


@openai_router.post("/rewards")
async def score_rewards(
    body: RewardRequest, request: Request, handler: RewardsHandlerDep, ticket: TicketDep
) -> RewardList:
    """Rewards of (prompt, response) pairs from the server's scorers, as the methods compute them (alignd's
    extension; ``alignd eval`` measures with it)."""
    meter = UsageMeter()
    meter_usage(request, meter, work=0)
    request.state.model = body.model
    return await handler.create(body, ticket, caller(request), meter)


@ops_router.get("/health")
async def health() -> dict[str, str]:
    """Liveness: the process answers, whether or not models have loaded."""
    return {"status": "ok"}


@ops_router.get("/ready")
async def ready(request: Request, registry: RegistryDep) -> JSONResponse:
    """Readiness: every configured model is loaded, and the gateway is not draining to stop."""
    if request.app.state.drain.draining:
        error = ShuttingDownError("The server is shutting down.")
        return JSONResponse(error_payload(error), status_code=error.status_code)
    if registry.ready:
        return JSONResponse({"status": "ready", "models": registry.describe()})
    reason = registry.load_error or "models are still loading"
    return JSONResponse(error_payload(EngineUnavailableError(reason)), status_code=503)


@ops_router.get("/metrics")
async def metrics(metrics: MetricsDep) -> Response:
    metrics.loop_tasks.set(len(asyncio.all_tasks()))
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)


class TrieList(BaseModel):
    object: Literal["list"] = "list"
    data: list[TrieSummary]


class TriesDeleted(BaseModel):
    deleted: int


@admin_router.get("/grammar/tries")
async def list_tries(grammars: GrammarsDep) -> TrieList:
    """What ASAp has learned in this gateway (in-process engines; vLLM workers keep their own tries)."""
    return TrieList(data=grammars.store.summaries())


@admin_router.delete("/grammar/tries/{key}")
async def drop_trie(key: str, grammars: GrammarsDep) -> TriesDeleted:
    """Forgets one key's trie: its next request samples like GCD again."""
    if not grammars.store.drop(key):
        raise RouteError(f"There is no ASAp trie with the key `{key}`.", 404)
    return TriesDeleted(deleted=1)


@admin_router.delete("/grammar/tries")
async def drop_tries(grammars: GrammarsDep) -> TriesDeleted:
    """Forgets every trie."""
    return TriesDeleted(deleted=grammars.store.clear())
