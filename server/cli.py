"""``alignd``: serve the gateway, evaluate a deployment, build the toy world, or build the tiny offline models."""

from __future__ import annotations

import argparse
import logging
import logging.config
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from server.config import Settings

logger = logging.getLogger("alignd")

# After the drain (server/drain.py), what is still running gets this long before it is cancelled.
GRACE_AFTER_DRAIN_S = 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="alignd", description="Inference-time alignment decoding server.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the OpenAI-compatible gateway")
    serve.add_argument("--config", type=Path, help="YAML configuration (default: the embedded toy world)")
    serve.add_argument("--host", help="overrides `host`")
    serve.add_argument("--port", type=int, help="overrides `port`")

    world = commands.add_parser("make-toy-world", help="generate the toy world and train its models into DIR")
    world.add_argument("directory", type=Path)
    world.add_argument("--seed", type=int, default=0, help="the world and its training (default 0)")
    world.add_argument("--force", action="store_true", help="rebuild even if DIR holds this seed's world already")

    commands.add_parser(
        "eval", help="measure alignment configurations against a deployment (`alignd eval --help`)", add_help=False
    )

    tiny = commands.add_parser("make-tiny-models", help="build the tiny random offline models into DIR")
    tiny.add_argument("directory", type=Path)

    _add_keys_parser(commands)

    arguments = sys.argv[1:] if argv is None else argv
    if arguments[:1] == ["eval"]:
        from evaluation.cli import main as evaluate

        return evaluate(arguments[1:])
    args = parser.parse_args(arguments)
    if args.command == "make-tiny-models":
        from models.tiny import make_tiny_models

        print(make_tiny_models(args.directory))
        return 0
    if args.command == "keys":
        from server.keys_cli import run_keys_command

        return run_keys_command(args)
    if args.command == "make-toy-world":
        return _make_toy_world(args.directory, args.seed, force=args.force)
    return _serve(args.config, host=args.host, port=args.port)


def _add_keys_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = commands.add_parser("keys", help="API keys").add_subparsers(dest="keys_command", required=True)
    create = keys.add_parser("create", help="a new key, printed once: stored (with --config) or as an entry to paste")
    create.add_argument("--name", required=True)
    create.add_argument("--models", nargs="+", help="models and profiles it may use (default: all)")
    create.add_argument("--methods", nargs="+", help="alignment methods it may use (default: all)")
    create.add_argument("--requests-per-minute", type=int)
    create.add_argument("--tokens-per-minute", type=int)
    create.add_argument("--work-per-day", type=int)
    create.add_argument("--max-concurrent", type=int)
    create.add_argument("--expires-at", help="ISO 8601 instant after which it is refused")
    create.add_argument("--admin", action="store_true")
    create.add_argument("--config", type=Path, help="store it in this config's key store")
    listing = keys.add_parser("list", help="every key of a config and its store, without secrets")
    listing.add_argument("--config", type=Path, required=True)
    for name, text in (("revoke", "refuse a stored key from now on"), ("rotate", "a new secret for a stored key")):
        command = keys.add_parser(name, help=text)
        command.add_argument("name")
        command.add_argument("--config", type=Path, required=True)


def _make_toy_world(directory: Path, seed: int, *, force: bool) -> int:
    from toyworld.build import ToyWorldError, ensure_toy_world, make_toy_world

    _quiet_libraries()
    try:
        print(make_toy_world(directory, seed) if force else ensure_toy_world(directory, seed))
    except ToyWorldError as exc:
        print(f"alignd: {exc}", file=sys.stderr)
        return 2
    return 0


def _serve(config: Path | None, *, host: str | None, port: int | None) -> int:
    import uvicorn
    from pydantic import ValidationError

    from server.config import ModelConfig, ScorerConfig, Settings
    from server.logs import logging_config

    try:
        settings = Settings.load(config)
    except (OSError, ValueError, ValidationError) as exc:
        print(f"alignd: invalid configuration {config or '(embedded)'}:\n{exc}", file=sys.stderr)
        return 2
    settings = settings.model_copy(update={k: v for k, v in {"host": host, "port": port}.items() if v is not None})
    log_config = logging_config(settings.log_level)
    logging.config.dictConfig(log_config)
    _quiet_libraries()
    if settings.tiny_models:
        from models.tiny import ensure_tiny_models

        logger.info("preparing tiny models", extra={"path": str(settings.model_root)})
        ensure_tiny_models(settings.model_root)
    if settings.toy_world:
        from toyworld.build import ToyWorldError, ensure_toy_world, toy_world_ready

        if not toy_world_ready(settings.model_root):
            logger.info("building the toy world (first start: a few minutes)", extra={"path": str(settings.model_root)})
        try:
            ensure_toy_world(settings.model_root)
        except ToyWorldError as exc:
            print(f"alignd: {exc}", file=sys.stderr)
            return 2
    entries: list[ModelConfig | ScorerConfig] = [*settings.models, *settings.scorers]
    missing = [f"{e.name}: {e.path}" for e in entries if e.path is not None and not e.path.exists()]
    if missing:
        print("alignd: model directories not found:\n  " + "\n  ".join(missing), file=sys.stderr)
        return 2

    from server.http import PROTOCOL, READ_TIMEOUT_ENV

    os.environ[READ_TIMEOUT_ENV] = str(settings.read_timeout_s)
    options: dict[str, Any] = {
        "host": settings.host, "port": settings.port, "log_config": log_config, "http": PROTOCOL,
        "timeout_keep_alive": settings.keep_alive_s, "timeout_graceful_shutdown": GRACE_AFTER_DRAIN_S,
    }  # fmt: skip
    if settings.processes == 1:
        from server.app import build_app

        uvicorn.run(build_app(settings), **options)
        return 0
    _serve_processes(settings, options)
    return 0


def _serve_processes(settings: Settings, options: dict[str, Any]) -> None:
    """``settings.processes`` gateway processes on one port (uvicorn's workers), their metrics shared."""
    import uvicorn

    from server.app import SETTINGS_ENV
    from server.metrics import MULTIPROCESS_DIR

    with tempfile.TemporaryDirectory(prefix="alignd-metrics-") as metrics:
        os.environ[MULTIPROCESS_DIR] = metrics
        os.environ[SETTINGS_ENV] = settings.model_dump_json()
        logger.info("starting gateway processes", extra={"processes": settings.processes})
        uvicorn.run("server.app:app_from_environment", factory=True, workers=settings.processes, **options)


def _quiet_libraries() -> None:
    """Progress bars and advisory warnings from model libraries are noise in JSON logs."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()


if __name__ == "__main__":
    sys.exit(main())
