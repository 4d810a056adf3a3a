"""``alignd eval``: run a matrix of configurations on a task file against a deployment, then report.

    alignd eval --suite toy                                   # the toy world, on a gateway started here
    alignd eval --matrix M.yaml --tasks T.jsonl --host URL    # any deployment
    alignd eval --matrix M.yaml --tasks gsm8k.jsonl --format gsm8k --config deploy/my.yaml

Writes ``results.jsonl`` (one line per finished request; a rerun resumes), then ``summary.json``,
``report.md`` and the plots into ``--output``. Exit status: 0 done, 1 stopped (nothing reported; rerun to
resume), 2 bad input (nothing sent).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from importlib import resources
from pathlib import Path
from typing import get_args

from evaluation.gateway import LocalGateway
from evaluation.matrix import Matrix, MatrixError, load_matrix, parse_matrix
from evaluation.report import write_report
from evaluation.run import Evaluation, EvaluationError, client_for
from evaluation.summary import summarize
from evaluation.tasks import Format, TaskFile, TaskFileError, load_tasks

TOY_WORLD = Path("~/.cache/alignd/toy-world")
SUITES = ("toy",)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alignd eval", description=__doc__.split("\n\n")[0])
    what = parser.add_argument_group("what to run")
    what.add_argument("--suite", choices=SUITES, help="a shipped suite: its matrix and tasks")
    what.add_argument("--matrix", type=Path, help="a matrix YAML (see the README's Evaluation section)")
    what.add_argument("--tasks", type=Path, help="a tasks JSONL (with --suite toy: default the toy world's)")
    what.add_argument("--format", choices=get_args(Format), default="alignd", help="the task file's format")
    what.add_argument("--skip-bad", action="store_true", help="run the good lines of a task file with bad ones")
    what.add_argument("--limit", type=int, help="at most this many tasks per category (a bounded smoke)")
    where = parser.add_argument_group("against what").add_mutually_exclusive_group()
    where.add_argument("--host", help="a running deployment's URL (default with --suite toy: a local gateway)")
    where.add_argument("--config", type=Path, help="start `alignd serve --config FILE` here, stop it afterwards")
    parser.add_argument("--api-key", default=os.environ.get("ALIGND_API_KEY"), help="default: $ALIGND_API_KEY")
    parser.add_argument("--output", type=Path, help="default: eval-results/<matrix name>")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request (default 600)")
    parser.add_argument("--startup-timeout", type=float, default=900.0, help="--config: seconds to become ready")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        matrix, task_file = _inputs(args)
    except (MatrixError, TaskFileError, OSError, ValueError) as exc:
        print(f"alignd eval: {exc}", file=sys.stderr)
        return 2
    for problem in task_file.skipped:
        print(f"alignd eval: skipped {problem}", file=sys.stderr)
    output = args.output or Path("eval-results") / matrix.name
    try:
        if args.host:
            asyncio.run(_evaluate(args, matrix, task_file, output, args.host, args.host))
        else:
            with tempfile.TemporaryDirectory() as scratch, _gateway(args, Path(scratch)) as gateway:
                label = f"a gateway started here ({args.config or 'the embedded default'})"
                asyncio.run(_evaluate(args, matrix, task_file, output, gateway.url, label))
    except (EvaluationError, RuntimeError, TimeoutError) as exc:
        print(f"alignd eval: stopped: {exc}\n(finished requests are in {output}/results.jsonl; rerun to resume)",
              file=sys.stderr)  # fmt: skip
        return 1
    print(f"alignd eval: wrote {output}/summary.json and {output}/report.md")
    return 0


async def _evaluate(
    args: argparse.Namespace, matrix: Matrix, task_file: TaskFile, output: Path, url: str, deployment: str
) -> None:
    client = client_for(url, api_key=args.api_key, timeout=args.timeout)
    async with client:
        evaluation = Evaluation(client, matrix, task_file.tasks, output, concurrency=args.concurrency,
                                progress=not args.no_progress)  # fmt: skip
        outcomes = await evaluation.run()
    summary = summarize(matrix, outcomes, deployment=deployment, tasks=len(task_file.tasks))
    (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    write_report(summary, output)


def _inputs(args: argparse.Namespace) -> tuple[Matrix, TaskFile]:
    if args.suite:
        matrix = parse_matrix(_suite(args.suite), source=f"suite {args.suite}")
        tasks = args.tasks or TOY_WORLD.expanduser() / "tasks.jsonl"
        if args.matrix:
            raise ValueError("give --suite or --matrix, not both")
    elif args.matrix and args.tasks:
        matrix, tasks = load_matrix(args.matrix), args.tasks
    else:
        raise ValueError("give --suite, or both --matrix and --tasks")
    if not args.host and args.config is None and not args.suite:
        raise ValueError("give --host URL or --config FILE")
    if args.suite and args.tasks is None and not tasks.exists():
        raise ValueError(f"{tasks} does not exist: build the toy world (`alignd make-toy-world {tasks.parent}`)")
    task_file = load_tasks(tasks, format=args.format, skip_bad=args.skip_bad)
    if args.limit is not None:
        task_file = TaskFile(_per_category(task_file.tasks, args.limit), task_file.skipped)
    return matrix, task_file


def _suite(name: str) -> object:
    import yaml

    return yaml.safe_load(resources.files("evaluation").joinpath(f"suites/{name}.yaml").read_text(encoding="utf-8"))


def _per_category(tasks: list[dict[str, object]], limit: int) -> list[dict[str, object]]:
    counts: dict[object, int] = {}
    kept = []
    for task in tasks:
        counts[task.get("category")] = counts.get(task.get("category"), 0) + 1
        if counts[task.get("category")] <= limit:
            kept.append(task)
    return kept


def _gateway(args: argparse.Namespace, scratch: Path) -> LocalGateway:
    """``--config FILE``, or the embedded default (the toy world) for a suite without ``--host``."""
    print("alignd eval: starting a local gateway (a first start builds the toy world: minutes)", file=sys.stderr)
    return LocalGateway(args.config, scratch / "alignd.log", startup_timeout=args.startup_timeout)
