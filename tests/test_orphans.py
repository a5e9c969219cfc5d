"""`icd run` killed with SIGKILL leaves no process behind (Prefect's temporary server and
its watchdog end with it)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _processes() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, state, command line) of every process."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        out[int(entry.name)] = (int(fields[1]), fields[0], cmd)
    return out


def _descendants(pid: int) -> dict[int, str]:
    procs = _processes()
    found: dict[int, str] = {}
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, (ppid, _, cmd) in procs.items():
            if ppid == parent and child not in found:
                found[child] = cmd
                frontier.append(child)
    return found


def _alive(pids: set[int]) -> set[int]:
    procs = _processes()
    return {p for p in pids if p in procs and procs[p][1] != "Z"}


def test_sigkill_of_icd_run_leaves_no_process(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "icd.cli",
        "run",
        "--no-progress",
        *("--set", f"storage.root={tmp_path}", "--set", "data.limit=64"),
    ]
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            kids = _descendants(proc.pid)
            if any("uvicorn" in c for c in kids.values()):
                break
            assert proc.poll() is None, "the run ended before its server started"
            time.sleep(0.1)
        else:
            pytest.fail("the temporary Prefect server never started")
        time.sleep(1.0)  # the run is under way (its watchdog, if any, has started)
        kids = _descendants(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)  # the run only, not its process group
        proc.wait()
        deadline = time.time() + 15
        while _alive(set(kids)) and time.time() < deadline:
            time.sleep(0.1)
        left = {p: kids[p] for p in _alive(set(kids))}
        assert not left, f"left behind: {left}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # clean up whatever a failure left
