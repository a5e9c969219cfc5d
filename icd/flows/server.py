"""Prefect's temporary (ephemeral) server for flows run in this process, tied to it.

Without ``PREFECT_API_URL`` Prefect starts a temporary API server as a child process on first
use and stops it at exit. A process killed with SIGKILL runs no exit handler, and the
server would live on, orphaned. :func:`start_local_server` starts that server up front and
ties it to this process with a watchdog: a tiny child that blocks reading a pipe whose only
writer is this process. When this process ends, however it ends, the kernel closes the pipe
and the watchdog stops the server (SIGTERM, then SIGKILL) and exits.

It also serialises the server's first start on a fresh ``PREFECT_HOME`` (the database
migration), so runs started at the same instant on a new machine do not race on it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from icd.storage.locks import file_lock

# Runs in the watchdog process: wait for EOF on stdin (this process died or exited), then
# stop the server if the pid still names it.
_WATCHDOG = r"""
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
pid = int(sys.argv[1])
sys.stdin.buffer.read()
def alive():
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
    except OSError:
        return False
    return state != "Z" and b"uvicorn" in cmd
for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
    if not alive():
        break
    try:
        os.kill(pid, sig)
    except OSError:
        break
    end = time.monotonic() + wait
    while alive() and time.monotonic() < end:
        time.sleep(0.05)
"""

_TIED: dict[int, subprocess.Popen[bytes]] = {}


def start_local_server() -> int | None:
    """Start Prefect's temporary server now, tied to this process; return its pid.

    Nothing to do (None) when ``PREFECT_API_URL`` names a server or ephemeral mode is off.
    Call it from the main thread before the first flow runs; the flow then uses this server.
    """
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_HOME,
        PREFECT_SERVER_EPHEMERAL_ENABLED,
    )

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return None
    import prefect
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    if not server.running:
        home = Path(PREFECT_HOME.value())
        ready = home / f".icd-server-ready-{prefect.__version__}"
        if ready.exists():
            server.start()
        else:  # first start on this PREFECT_HOME: one process migrates, the others wait
            with file_lock(home / ".icd-server.lock"):
                server.start()
                ready.touch()
    process = server.server_process
    if process is None:
        return None
    if process.pid not in _TIED:
        _TIED[process.pid] = tie_to_this_process(process.pid)
    return process.pid


def tie_to_this_process(pid: int) -> subprocess.Popen[bytes]:
    """Start a watchdog that stops process ``pid`` once this process has ended."""
    read, write = os.pipe()  # both ends non-inheritable: no other child holds the writer
    try:
        watchdog = subprocess.Popen(
            [sys.executable, "-S", "-c", _WATCHDOG, str(pid)],
            stdin=read,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    finally:
        os.close(read)
    # Kept open for the life of this process (never written): its closing is the signal.
    _WRITERS.append(write)
    return watchdog


_WRITERS: list[int] = []
