"""API keys managed at run time (``alignd keys create|list|revoke|rotate``), beside the config's ``auth.keys``.

With ``state.url`` they live in Valkey/Redis, seen at once by every gateway replica: ``alignd/keys/<sha256>``
holds a key's entry (JSON) and the hash ``alignd/key-names`` maps each name to its key's SHA-256. Every change
is one transaction under ``WATCH``, so two administrators cannot give one name two keys. Without ``state.url``
they live in ``auth.key_file`` (JSON, replaced atomically, changed under a lock), which a gateway reads again
whenever it has changed.

A presented key is looked up by its SHA-256, never compared as plaintext: what the lookup's timing could tell
is whether a hash is stored, and finding a key with a given hash is the whole brute force.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import redis.asyncio as redis_asyncio
from pydantic import TypeAdapter, ValidationError
from redis.exceptions import RedisError

from models.errors import StoreUnavailableError
from server.config import ApiKeyConfig, Settings
from server.quotas import STORE_TIMEOUT_S

logger = logging.getLogger(__name__)

ENTRY_PREFIX = "alignd/keys"
NAMES = "alignd/key-names"
_ENTRIES = TypeAdapter(list[ApiKeyConfig])


class KeyStoreError(ValueError):
    """A change the store refuses: a name already taken, or one it does not hold."""


class KeyStore(Protocol):
    async def find(self, digest: str) -> ApiKeyConfig | None:
        """The key whose SHA-256 is ``digest``; None if there is none."""
        ...

    async def entries(self) -> list[ApiKeyConfig]: ...

    async def add(self, entry: ApiKeyConfig) -> None:
        """Stores a new key; ``KeyStoreError`` if its name is taken."""
        ...

    async def replace(self, name: str, entry: ApiKeyConfig) -> None:
        """``name``'s key becomes ``entry`` (a rotation): the old key is refused from now on."""
        ...

    async def remove(self, name: str) -> None:
        """Revokes ``name``'s key; ``KeyStoreError`` if the store does not hold it."""
        ...

    async def close(self) -> None: ...


class FileKeys:
    """Keys in a JSON file, for a single gateway without ``state.url``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._version: tuple[int, int, int] | None = None
        self._by_hash: dict[str, ApiKeyConfig] = {}

    async def find(self, digest: str) -> ApiKeyConfig | None:
        self._reload_if_changed()
        return self._by_hash.get(digest)

    async def entries(self) -> list[ApiKeyConfig]:
        return self._read()

    async def add(self, entry: ApiKeyConfig) -> None:
        with self._locked() as entries:
            if any(stored.name == entry.name for stored in entries):
                raise KeyStoreError(f"the key store holds a key named `{entry.name}` already")
            entries.append(entry)

    async def replace(self, name: str, entry: ApiKeyConfig) -> None:
        with self._locked() as entries:
            entries[_index(entries, name)] = entry

    async def remove(self, name: str) -> None:
        with self._locked() as entries:
            del entries[_index(entries, name)]

    async def close(self) -> None:
        """Nothing is held open: the file is read and written whole."""

    def _reload_if_changed(self) -> None:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            self._version, self._by_hash = None, {}
            return
        version = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if version != self._version:
            self._by_hash = {entry.hash: entry for entry in self._read()}
            self._version = version

    def _read(self) -> list[ApiKeyConfig]:
        try:
            return _ENTRIES.validate_json(self.path.read_bytes())
        except FileNotFoundError:
            return []
        except ValidationError as exc:
            # Refuse every stored key rather than guess which entries are sound; the config's keys still work.
            logger.error("the key file is invalid; its keys are refused", extra={"path": str(self.path)})
            raise StoreUnavailableError("The API key store is unreadable; an administrator must repair it.") from exc

    @contextmanager
    def _locked(self) -> Iterator[list[ApiKeyConfig]]:
        """The stored entries, to change; written back atomically (write, then rename) under a lock."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            entries = self._read()
            yield entries
            staged = self.path.with_name(self.path.name + ".tmp")
            staged.write_bytes(_ENTRIES.dump_json(entries, indent=2, exclude_defaults=True))
            os.chmod(staged, 0o600)
            os.replace(staged, self.path)


class RedisKeys:
    """Keys in Valkey/Redis, shared by every gateway replica."""

    def __init__(self, url: str) -> None:
        self.client = redis_asyncio.from_url(url, socket_timeout=STORE_TIMEOUT_S)

    async def find(self, digest: str) -> ApiKeyConfig | None:
        try:
            stored = await self.client.get(f"{ENTRY_PREFIX}/{digest}")
        except RedisError as exc:
            raise StoreUnavailableError("The API key store cannot be reached; retry shortly.") from exc
        if stored is None:
            return None
        try:
            return ApiKeyConfig.model_validate_json(stored)
        except ValidationError as exc:
            logger.error("a stored key entry is invalid; it is refused", extra={"entry": f"{ENTRY_PREFIX}/{digest}"})
            raise StoreUnavailableError("The API key store is unreadable; an administrator must repair it.") from exc

    async def entries(self) -> list[ApiKeyConfig]:
        digests = await self.client.hvals(NAMES)  # type: ignore[misc]  # redis-py types both clients alike
        stored = await self.client.mget([f"{ENTRY_PREFIX}/{digest.decode()}" for digest in digests]) if digests else []
        return sorted((ApiKeyConfig.model_validate_json(raw) for raw in stored if raw is not None),
                      key=lambda entry: entry.name)  # fmt: skip

    async def add(self, entry: ApiKeyConfig) -> None:
        async def claim(pipe: redis_asyncio.client.Pipeline) -> None:
            if await pipe.hexists(NAMES, entry.name):  # type: ignore[misc]
                raise KeyStoreError(f"the key store holds a key named `{entry.name}` already")
            pipe.multi()
            pipe.set(f"{ENTRY_PREFIX}/{entry.hash}", entry.model_dump_json(exclude_defaults=True))
            pipe.hset(NAMES, entry.name, entry.hash)

        await self.client.transaction(claim, NAMES)

    async def replace(self, name: str, entry: ApiKeyConfig) -> None:
        async def swap(pipe: redis_asyncio.client.Pipeline) -> None:
            old = await self._stored_hash(pipe, name)
            pipe.multi()
            pipe.delete(f"{ENTRY_PREFIX}/{old}")
            pipe.set(f"{ENTRY_PREFIX}/{entry.hash}", entry.model_dump_json(exclude_defaults=True))
            pipe.hset(NAMES, name, entry.hash)

        await self.client.transaction(swap, NAMES)

    async def remove(self, name: str) -> None:
        async def revoke(pipe: redis_asyncio.client.Pipeline) -> None:
            old = await self._stored_hash(pipe, name)
            pipe.multi()
            pipe.delete(f"{ENTRY_PREFIX}/{old}")
            pipe.hdel(NAMES, name)

        await self.client.transaction(revoke, NAMES)

    async def close(self) -> None:
        await self.client.aclose()

    @staticmethod
    async def _stored_hash(pipe: redis_asyncio.client.Pipeline, name: str) -> str:
        digest = await pipe.hget(NAMES, name)  # type: ignore[misc]
        if digest is None:
            raise KeyStoreError(f"the key store holds no key named `{name}`")
        return str(digest.decode())


def _index(entries: list[ApiKeyConfig], name: str) -> int:
    for index, entry in enumerate(entries):
        if entry.name == name:
            return index
    raise KeyStoreError(f"the key store holds no key named `{name}`")


def key_store(settings: Settings) -> KeyStore | None:
    """The configured store of run-time keys: Valkey/Redis with ``state.url``, else ``auth.key_file``, else none."""
    if settings.state.redis_url is not None:
        return RedisKeys(settings.state.redis_url)
    return None if settings.auth.key_file is None else FileKeys(settings.auth.key_file)


def describe(entry: ApiKeyConfig, source: str) -> dict[str, object]:
    """One key as ``alignd keys list`` prints it: everything but its hash."""
    return {"name": entry.name, "source": source, **json.loads(entry.model_dump_json(exclude={"name", "hash"}))}
