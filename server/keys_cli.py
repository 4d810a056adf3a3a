"""``alignd keys create|list|revoke|rotate``: API keys, printed as a config entry or kept in the key store.

Without ``--config``, ``create`` prints a new key and the ``auth.keys`` entry that holds its hash. With it,
every command works on the store that config names (``state.url``, else ``auth.key_file``), which every
gateway using that config sees at once, without a restart. A key's plaintext is printed once, at creation or
rotation; the store keeps its SHA-256 only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import UTC, datetime

import yaml
from pydantic import ValidationError

from models.errors import StoreUnavailableError
from server.auth import key_hash, new_key
from server.config import ApiKeyConfig, Settings
from server.keystore import KeyStore, KeyStoreError, describe, key_store

LIMITS = ("models", "methods", "requests_per_minute", "tokens_per_minute", "work_per_day", "max_concurrent",
          "expires_at", "admin")  # fmt: skip


class KeysCommandError(Exception):
    """What the command could not do, for its user."""


def run_keys_command(args: argparse.Namespace) -> int:
    commands: dict[str, Callable[[argparse.Namespace], Coroutine[None, None, None]]] = {
        "create": _create, "list": _list, "revoke": _revoke, "rotate": _rotate,
    }  # fmt: skip
    try:
        asyncio.run(commands[args.keys_command](args))
    except (KeysCommandError, KeyStoreError, StoreUnavailableError, ValidationError, ValueError) as exc:
        print(f"alignd keys {args.keys_command}: {exc}", file=sys.stderr)
        return 2
    return 0


async def _create(args: argparse.Namespace) -> None:
    key = new_key()
    entry = ApiKeyConfig(name=args.name, hash=key_hash(key), created_at=_now(),
                         **{name: getattr(args, name) for name in LIMITS})  # fmt: skip
    if args.config is None:
        _print_key(key)
        print("Its entry under `auth.keys`:")
        print(yaml.safe_dump([entry.model_dump(mode="json", exclude_defaults=True)], sort_keys=False), end="")
        return
    settings = Settings.load(args.config)
    if any(configured.name == entry.name for configured in settings.auth.keys):
        raise KeysCommandError(f"`{entry.name}` is a key of the config's `auth.keys` already")
    async with _store_of(settings) as store:
        await store.add(entry)
    _print_key(key)
    print(f"Stored as `{entry.name}`; every gateway with this config accepts it now.")


async def _list(args: argparse.Namespace) -> None:
    settings = Settings.load(args.config)
    rows = [describe(entry, "config") for entry in settings.auth.keys]
    if key_store(settings) is not None:
        async with _store_of(settings) as store:
            rows += [describe(entry, "store") for entry in await store.entries()]
    for row in rows:
        print(json.dumps(row))


async def _revoke(args: argparse.Namespace) -> None:
    async with _store_holding(args) as store:
        await store.remove(args.name)
    print(f"`{args.name}` is revoked; its recorded usage stays.")


async def _rotate(args: argparse.Namespace) -> None:
    async with _store_holding(args) as store:
        old = next((entry for entry in await store.entries() if entry.name == args.name), None)
        if old is None:
            raise KeyStoreError(f"the key store holds no key named `{args.name}`")
        key = new_key()
        await store.replace(args.name, old.model_copy(update={"hash": key_hash(key), "created_at": _now()}))
    _print_key(key)
    print(f"`{args.name}` has this new key; the old one is refused from now on.")


def _store_holding(args: argparse.Namespace) -> contextlib.AbstractAsyncContextManager[KeyStore]:
    """The store holding ``args.name``; a key of the config file itself is changed by editing that file."""
    settings = Settings.load(args.config)
    if any(entry.name == args.name for entry in settings.auth.keys):
        raise KeysCommandError(f"`{args.name}` is in the config's `auth.keys`: change it there")
    return _store_of(settings)


@contextlib.asynccontextmanager
async def _store_of(settings: Settings) -> AsyncIterator[KeyStore]:
    store = key_store(settings)
    if store is None:
        raise KeysCommandError("the config has no key store: set `state.url` or `auth.key_file`")
    try:
        yield store
    finally:
        await store.close()


def _print_key(key: str) -> None:
    print(f"API key (shown once; alignd keeps only its hash):\n  {key}\n")


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)
