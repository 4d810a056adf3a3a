"""Managed vLLM workers: launched, health-checked at start, restarted with backoff, stopped.

Each worker is a vLLM OpenAI-compatible server in its own process group (vLLM
runs its engine core in a child process; stopping the group stops both).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from models.replicas import HealthProbe

logger = logging.getLogger(__name__)

DEFAULT_COMMAND = (sys.executable, "-m", "vllm.entrypoints.openai.api_server")
SNAPSHOT_ENV = "ALIGND_GRAMMAR_SNAPSHOT"
SNAPSHOT_INTERVAL_ENV = "ALIGND_GRAMMAR_SNAPSHOT_INTERVAL_S"
"""Where a managed worker's grammar plugin keeps its tries, and how often it writes them (the plugin reads
these; they are defined here, where the gateway sets them, because models cannot import decoding)."""
GROUP_POLL_S = 0.1
SNAPSHOT_SHUTDOWN_TIMEOUT_S = 10
"""vLLM's ``--shutdown-timeout`` for a worker that keeps its tries. At the default (0) vLLM's API server
SIGKILLs its engine core and model-runner processes as soon as it gets SIGTERM, before the plugin in the
model-runner process writes what it learned since its last periodic write; with it the API server waits
that long for them to exit. Below ``ManagedWorker.stop``'s 30 s."""


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What to launch for one model; ``args`` are vLLM command-line arguments, ``cpus`` the CPUs its
    processes may run on (empty: any), ``trie_snapshots`` the directory where each replica's grammar plugin
    keeps its ASAp tries (none: in memory only), written every ``trie_snapshot_interval_s``."""

    name: str
    model_path: Path
    served_name: str
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    command: tuple[str, ...] = DEFAULT_COMMAND
    cpus: tuple[int, ...] = ()
    trie_snapshots: Path | None = None
    trie_snapshot_interval_s: float = 60.0


@dataclass(frozen=True, slots=True)
class Supervision:
    startup_timeout_s: float = 600.0
    restart_backoff_s: float = 1.0
    max_restart_backoff_s: float = 60.0
    health_timeout_s: float = 3.0


class WorkerStartError(RuntimeError):
    """A managed worker exited or stayed unhealthy while starting."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


GUARD = (sys.executable, "-m", "models.worker_guard", "--")
"""Every managed worker runs under ``models.worker_guard``: it cannot outlive the gateway."""


class ManagedWorker:
    """One vLLM server process on a loopback port, kept running until ``stop``.

    Args:
        spec: what to launch.
        index: the replica number, for the log file name.
        log_dir: where the worker's output goes (``{name}-{index}.log``).
        probe: checks the worker's ``/health``.
        supervision: timeouts and restart backoff.
    """

    def __init__(
        self, spec: WorkerSpec, index: int, log_dir: Path, probe: HealthProbe, supervision: Supervision
    ) -> None:
        self.spec = spec
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"{spec.name}-{index}.log"
        self.trie_snapshot = spec.trie_snapshots / f"{spec.name}-{index}.tries.json.gz" if spec.trie_snapshots else None
        self.restarts = 0
        self._probe = probe
        self._supervision = supervision
        self._process: asyncio.subprocess.Process | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process and self._process.returncode is None else None

    def command(self) -> list[str]:
        # The guard leads the worker's process group (its pid is the group's); taskset execs the server, whose
        # threads and child processes (engine core, model runner) inherit the CPU set.
        pinned = ("taskset", "--cpu-list", ",".join(map(str, self.spec.cpus))) if self.spec.cpus else ()
        return [
            *GUARD,
            *pinned,
            *self.spec.command,
            "--model", str(self.spec.model_path),
            "--served-model-name", self.spec.served_name,
            "--host", "127.0.0.1",
            "--port", str(self.port),
            *self.snapshot_args(),
            *self.spec.args,
        ]  # fmt: skip

    def snapshot_args(self) -> tuple[str, ...]:
        """vLLM's arguments for a replica that keeps its tries (the spec's ``args`` come after: they win)."""
        return ("--shutdown-timeout", str(SNAPSHOT_SHUTDOWN_TIMEOUT_S)) if self.trie_snapshot is not None else ()

    def environment(self) -> dict[str, str]:
        """The gateway's environment, the spec's, and this replica's own snapshot file: a restarted replica
        (or gateway) reads back the tries the replica learned, and the replicas never share one file (each
        learns the tries of the keys routed to it)."""
        env = {**os.environ, **self.spec.env}
        if self.trie_snapshot is not None:
            env[SNAPSHOT_ENV] = str(self.trie_snapshot)
            env[SNAPSHOT_INTERVAL_ENV] = str(self.spec.trie_snapshot_interval_s)
        return env

    async def start(self) -> None:
        """Launches the worker and waits until it is healthy; then keeps it running."""
        await self._spawn()
        await self._wait_healthy()
        self._supervisor = asyncio.create_task(self._supervise(), name=f"supervise-{self.spec.name}")

    async def stop(self, timeout: float = 30.0) -> None:
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
        process = self._process
        if process is None or process.returncode is not None:
            return
        _signal_group(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        try:
            await asyncio.wait_for(process.wait(), timeout)
            # The server's own children may outlive it a moment (vLLM's model-runner process, writing its
            # tries at exit): the worker has stopped when its whole group has.
            while group_alive(process.pid) and time.monotonic() < deadline:
                await asyncio.sleep(GROUP_POLL_S)
        except TimeoutError:
            pass
        _signal_group(process.pid, signal.SIGKILL)
        await process.wait()

    async def _spawn(self) -> None:
        if self.spec.cpus and shutil.which("taskset") is None:
            raise WorkerStartError(f"`cpus` of `{self.spec.name}` needs the `taskset` command (util-linux)")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._process = await asyncio.create_subprocess_exec(
                *self.command(),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=self.environment(),
                start_new_session=True,
            )
        logger.info("worker started", extra={"model": self.spec.name, "pid": self._process.pid, "url": self.url})

    async def _wait_healthy(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self._supervision.startup_timeout_s
        while time.monotonic() < deadline:
            if self._process.returncode is not None:
                raise WorkerStartError(
                    f"worker for `{self.spec.name}` exited with {self._process.returncode} while starting; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            if await self._probe(f"{self.url}/health", self._supervision.health_timeout_s) is None:
                return
            await asyncio.sleep(0.5)
        raise WorkerStartError(
            f"worker for `{self.spec.name}` was not healthy within {self._supervision.startup_timeout_s:.0f} s; "
            f"log {self.log_path}:\n{self.log_tail()}"
        )

    async def _supervise(self) -> None:
        failures = 0
        while not self._stopping:
            assert self._process is not None
            code = await self._process.wait()
            if self._stopping:
                return
            delay = min(self._supervision.max_restart_backoff_s, self._supervision.restart_backoff_s * 2**failures)
            logger.warning(
                "worker exited; restarting",
                extra={"model": self.spec.name, "code": code, "delay_s": delay, "log": str(self.log_path)},
            )
            await asyncio.sleep(delay)
            self.restarts += 1
            await self._spawn()
            try:
                await self._wait_healthy()
                failures = 0
            except WorkerStartError as exc:
                failures += 1
                logger.error("worker restart failed", extra={"model": self.spec.name, "error": str(exc)[:500]})
                if self._process.returncode is None:
                    _signal_group(self._process.pid, signal.SIGKILL)

    def log_tail(self, characters: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-characters:]
        except OSError:
            return ""


def group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (zombies do not count: in a container without an init
    nothing may ever reap them). Linux's /proc, where vLLM runs."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            state, _, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
            if int(group) == pgid and state != "Z":
                return True
    return False


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)
