"""API keys: ``Authorization: Bearer <key>``, as the ``openai`` SDK sends it.

Keys are random (``alignd keys create``) and only their SHA-256 is kept: a fast hash is enough for a
256-bit random secret (nothing to brute-force), and lets a key be found without the plaintext. A presented
key's hash is compared with every configured hash in constant time, so neither the timing nor the order of
the keys says how close a guess was; keys managed at run time are looked up by that hash in their store
(``server.keystore``). No key, a malformed, unknown or expired one is a 401
``invalid_api_key``; an address that sends too many of those in a minute gets 429s. A key in the query
string is refused (it would end up in access logs). ``/health`` and ``/ready`` stay open, and ``/metrics``
unless ``auth.metrics`` is ``admin``.

The middleware counts the request against the key's requests per minute and requests in flight, leaves the
key on the request's state (``request.state.api_key``) for the handlers' checks (models, methods, tokens,
work: ``server.serving``), and adds the key's ``x-ratelimit-*`` headers to the response.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from urllib.parse import parse_qsl

from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from decoding.pipeline import Prepared
from decoding.usage import UsageMeter
from models.errors import (
    AligndError,
    AuthenticationError,
    ModelNotFoundError,
    PermissionDeniedError,
    RateLimitExceededError,
)
from server.config import ApiKeyConfig, AuthConfig
from server.errors import error_payload
from server.keystore import KeyStore
from server.metrics import Metrics
from server.playground import is_playground_path
from server.quotas import Quotas, RateLimitHeaders
from server.usage import RequestUsage, UsageStore

KEY_PREFIX = "sk-alignd-"
OPEN_PATHS = frozenset({"/health", "/ready"})
QUERY_KEY_NAMES = frozenset({"api_key", "api-key", "apikey", "key", "access_token", "token"})
STATE_KEY, STATE_HEADERS, STATE_METER, STATE_WORK = "api_key", "ratelimit_headers", "usage_meter", "work"


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyRing:
    """The configured keys, then the store's, found by the hash of a presented key."""

    def __init__(self, keys: Sequence[ApiKeyConfig], store: KeyStore | None = None) -> None:
        self.keys = list(keys)
        self.store = store

    async def find(self, presented: str) -> ApiKeyConfig | None:
        digest = key_hash(presented)
        found = None
        for key in self.keys:  # every comparison runs: the time does not depend on which key matched
            if hmac.compare_digest(key.hash, digest):
                found = key
        if found is None and self.store is not None:
            found = await self.store.find(digest)
        return found


def bearer_token(scope: Scope) -> str | None:
    value = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def key_in_query(scope: Scope) -> bool:
    query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
    return any(name.lower() in QUERY_KEY_NAMES or value.startswith(KEY_PREFIX) for name, value in query)


class AuthMiddleware:
    """Authenticates every request outside ``OPEN_PATHS`` and counts it against its key's limits."""

    def __init__(
        self,
        app: ASGIApp,
        auth: AuthConfig,
        quotas: Quotas,
        usage: UsageStore,
        metrics: Metrics,
        store: KeyStore | None = None,
    ) -> None:
        self.app = app
        self.auth = auth
        self.keys = KeyRing(auth.keys, store)
        self.quotas = quotas
        self.usage = usage
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._open(scope["path"]):
            await self.app(scope, receive, send)
            return
        try:
            key = await self._authenticate(scope)
        except AligndError as error:
            await self._refuse(error, scope, receive, send)
            return
        if not await self._enter(key, scope, receive, send):
            return
        try:
            await self._serve(key, scope, receive, send)
        finally:
            await self.quotas.leave(key)

    def _open(self, path: str) -> bool:
        """The page and its files are open: the page asks for a key, then sends it with every request."""
        return path in OPEN_PATHS or (path == "/metrics" and self.auth.metrics == "open") or is_playground_path(path)

    async def _authenticate(self, scope: Scope) -> ApiKeyConfig:
        if key_in_query(scope):
            raise AuthenticationError("API keys are accepted only in the Authorization header, never in the URL.")
        address = scope["client"][0] if scope.get("client") else "unknown"
        await self.quotas.check_address(address)
        token = bearer_token(scope)
        key = None if token is None else await self.keys.find(token)
        if key is None or (key.expires_at is not None and key.expires_at <= datetime.now(UTC)):
            await self.quotas.count_failure(address)
            reason = "No API key was sent (Authorization: Bearer <key>)" if token is None else "Invalid API key"
            raise AuthenticationError(f"{reason}.")
        if scope["path"] == "/metrics" and not key.admin:
            raise PermissionDeniedError("`/metrics` needs an admin key.")
        return key

    async def _enter(self, key: ApiKeyConfig, scope: Scope, receive: Receive, send: Send) -> bool:
        """Counts the request against the key's limits, or answers it with the limit it is over."""
        headers = RateLimitHeaders()
        try:
            await self.quotas.admit(key, headers)
            if not await self.quotas.enter(key):
                raise RateLimitExceededError(
                    f"The key `{key.name}` has {key.max_concurrent} requests in flight; retry when one ends.",
                    retry_after_s=1,
                )
        except AligndError as error:
            await self._refuse(error, scope, receive, send, headers)
            return False
        scope.setdefault("state", {}).update({STATE_KEY: key, STATE_HEADERS: headers})
        return True

    async def _serve(self, key: ApiKeyConfig, scope: Scope, receive: Receive, send: Send) -> None:
        """Serves the request with the key's headers, then records its usage, once, however it ended."""
        state = scope["state"]
        headers: RateLimitHeaders = state[STATE_HEADERS]
        status = 500

        async def send_with_limits(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message).update(headers.values)
            await send(message)

        try:
            await self.app(scope, receive, send_with_limits)
        finally:
            usage = RequestUsage.of(key.name, state.get("model") or "-", status, state.get(STATE_METER),
                                    state.get(STATE_WORK, 0))  # fmt: skip
            self.metrics.key_requests.labels(key=key.name, status=str(status)).inc()
            self.metrics.key_tokens.labels(key=key.name, kind="prompt").inc(usage.prompt_tokens)
            self.metrics.key_tokens.labels(key=key.name, kind="completion").inc(usage.completion_tokens)
            await self.usage.record(usage)

    @staticmethod
    async def _refuse(
        error: AligndError, scope: Scope, receive: Receive, send: Send, limits: RateLimitHeaders | None = None
    ) -> None:
        headers = {**error.headers, **(limits.values if limits else {})}
        await JSONResponse(error_payload(error), status_code=error.status_code, headers=headers)(scope, receive, send)


def caller(raw: Request) -> ApiKeyConfig | None:
    """The key a request came with; None with auth off."""
    return getattr(raw.state, STATE_KEY, None)


def check_model(key: ApiKeyConfig, model: str) -> None:
    """A model the key may not use is not found: the key's holder does not learn that it exists."""
    if key.models is not None and model not in key.models:
        raise ModelNotFoundError(model)


def check_methods(key: ApiKeyConfig, methods: Iterable[str]) -> None:
    for method in methods:
        if key.methods is not None and method not in key.methods:
            raise PermissionDeniedError(f"The key `{key.name}` may not use `{method}`.", param=f"alignment.{method}")


def meter_usage(raw: Request, meter: UsageMeter, work: int) -> None:
    """What the request's key is charged when its response has ended: the meter's count by then, and ``work``."""
    setattr(raw.state, STATE_METER, meter)
    setattr(raw.state, STATE_WORK, work)


async def charge(raw: Request, key: ApiKeyConfig, prepared: Prepared) -> None:
    """Counts a prepared request's tokens (its prompt plus every sample's budget) and its work."""
    quotas: Quotas = raw.app.state.quotas
    headers: RateLimitHeaders = getattr(raw.state, STATE_HEADERS)
    meter_usage(raw, prepared.meter, prepared.work)
    samples = prepared.samples + prepared.extra_samples
    tokens = len(prepared.job.prompt_ids) + samples * prepared.job.sampling.max_tokens
    await quotas.charge_tokens(key, tokens, headers)
    await quotas.charge_work(key, prepared.work, headers)
