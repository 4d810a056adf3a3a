"""``python -m models.worker_guard -- COMMAND...``: runs a managed worker that cannot outlive the gateway.

The gateway starts each worker through this guard, in a process group of its own (the guard leads it).
The guard runs the command in that group and waits for it; when the process that started the guard is
gone (a SIGKILLed or crashed gateway, which cannot stop its workers itself), it kills the whole group:
the vLLM server and every process it started. A SIGTERM to the group reaches the worker directly; the
guard outlives it, so the gateway still sees the worker's own exit code.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

POLL_S = 0.5


def main(argv: list[str]) -> int:
    command = argv[1:] if argv[:1] == ["--"] else argv
    if not command:
        print("usage: python -m models.worker_guard -- COMMAND...", file=sys.stderr)
        return 2
    parent = os.getppid()
    # A handler, not SIG_IGN (which the worker would inherit): the group's SIGTERM stops the worker, and the
    # guard waits for it to finish.
    signal.signal(signal.SIGTERM, lambda *_: None)
    worker = subprocess.Popen(command)
    while True:
        try:
            return worker.wait(timeout=POLL_S)
        except subprocess.TimeoutExpired:
            if os.getppid() != parent:
                os.killpg(0, signal.SIGKILL)  # the guard's own group: it ends here too


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
