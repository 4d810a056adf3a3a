"""Managed workers against a stand-in server process (no vLLM): launch, CPU pinning, stop, no orphans."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from models import workers
from models.worker_http import WorkerHTTP
from models.workers import ManagedWorker, Supervision, WorkerSpec, WorkerStartError

# Answers /health like a vLLM server; takes (and ignores) the arguments the gateway gives vLLM.
STAND_IN = """
import argparse, http.server
parser = argparse.ArgumentParser()
parser.add_argument("--port", type=int)
port = parser.parse_known_args()[0].port

class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass

http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
"""


def stand_in(tmp_path: Path, cpus: tuple[int, ...] = ()) -> WorkerSpec:
    return WorkerSpec("m", tmp_path, "m", command=(sys.executable, "-c", STAND_IN), cpus=cpus)


async def unused_probe(url: str, timeout: float) -> str | None:
    raise AssertionError("this test's worker is never probed")


def allowed_cpus(pid: int) -> str:
    status = Path(f"/proc/{pid}/status").read_text()
    return next(line.split(":")[1].strip() for line in status.splitlines() if line.startswith("Cpus_allowed_list"))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads CPU affinity from /proc (Linux)")
async def test_a_worker_with_cpus_runs_pinned_to_them(tmp_path: Path):
    http = WorkerHTTP()
    worker = ManagedWorker(stand_in(tmp_path, cpus=(0,)), 0, tmp_path, http.probe, Supervision(startup_timeout_s=30))
    assert worker.command()[: len(workers.GUARD) + 3] == [*workers.GUARD, "taskset", "--cpu-list", "0"]
    await worker.start()
    try:
        assert worker.pid is not None
        (server,) = psutil.Process(worker.pid).children()  # the guard's one child: the pinned server
        assert allowed_cpus(server.pid) == "0" and allowed_cpus(worker.pid) != "0"
    finally:
        await worker.stop()
        await http.close()
    assert worker.pid is None


async def test_a_worker_without_cpus_is_launched_as_configured(tmp_path: Path):
    worker = ManagedWorker(stand_in(tmp_path), 0, tmp_path, unused_probe, Supervision())
    assert worker.command()[len(workers.GUARD)] == sys.executable


# A gateway stand-in: starts one guarded worker as the gateway does (a new session), says its pid, waits.
GATEWAY = """
import subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-m", "models.worker_guard", "--", "sleep", "300"], start_new_session=True)
print(worker.pid, flush=True)
time.sleep(300)
"""


def test_a_killed_gateway_leaves_no_worker_running():
    with subprocess.Popen([sys.executable, "-c", GATEWAY], stdout=subprocess.PIPE, text=True) as gateway:
        assert gateway.stdout is not None
        group = int(gateway.stdout.readline())
        deadline = time.monotonic() + 10
        while len(psutil.Process(group).children()) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        (sleeper,) = psutil.Process(group).children()
        gateway.kill()
    gone, alive = psutil.wait_procs([sleeper], timeout=10)
    assert gone and not alive
    with pytest.raises(ProcessLookupError):
        os.killpg(group, 0)


async def test_the_guard_hands_on_the_workers_exit_code(tmp_path: Path):
    guard = await asyncio.create_subprocess_exec(*workers.GUARD, sys.executable, "-c", "raise SystemExit(7)")
    assert await guard.wait() == 7


async def test_cpus_without_taskset_is_a_clear_start_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(workers.shutil, "which", lambda name: None)
    worker = ManagedWorker(stand_in(tmp_path, cpus=(0,)), 0, tmp_path, unused_probe, Supervision())
    with pytest.raises(WorkerStartError, match=r"`cpus` of `m` needs the `taskset` command"):
        await worker.start()


# vLLM's model-runner process at SIGTERM: it outlives the server a moment, and writes (its tries) at exit.
LINGERING = """
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: None)
signal.pause()
time.sleep(1.5)
open(sys.argv[1], "w").write("written")
"""
# A server that starts one, in its process group, and answers /health as STAND_IN does.
WITH_A_LINGERING_CHILD = (
    "import os, subprocess, sys\n"
    f"subprocess.Popen([sys.executable, '-c', {LINGERING!r}, os.environ['WRITTEN_AT']])\n" + STAND_IN
)


async def test_a_worker_has_stopped_when_its_whole_process_group_has(tmp_path: Path):
    written = tmp_path / "written"
    spec = WorkerSpec("m", tmp_path, "m", command=(sys.executable, "-c", WITH_A_LINGERING_CHILD),
                      env={"WRITTEN_AT": str(written)})  # fmt: skip
    http = WorkerHTTP()
    worker = ManagedWorker(spec, 0, tmp_path, http.probe, Supervision(startup_timeout_s=30))
    await worker.start()
    try:
        group = worker.pid
        assert group is not None
    finally:
        await worker.stop()
        await http.close()
    assert written.read_text() == "written"  # the child finished its write before stop() returned
    assert not workers.group_alive(group)
