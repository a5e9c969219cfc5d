"""Real servers on loopback for tests (Prefect, MLflow UI): a free port, a process in its own
group, a wait for its health endpoint, and a stop that takes its whole tree."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

from icd.bench.loopback import free_port as free_port  # re-exported for the tests
from icd.bench.loopback import start as start_in
from icd.bench.loopback import stop as stop
from icd.bench.loopback import wait_healthy as wait_healthy

REPO = Path(__file__).resolve().parents[1]


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """``cmd`` in the repository folder (:func:`icd.bench.loopback.start`)."""
    return start_in(cmd, env, log, cwd=REPO)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` and every process below it, whatever group they are in (a worker's
    flow-run subprocesses), as a machine failure would."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [proc.pid]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    for pid in tree:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
