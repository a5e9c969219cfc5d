"""Prefect's temporary (ephemeral) server for flows run in this process, tied to it.

Without ``PREFECT_API_URL`` Prefect starts a temporary API server as a child process on first
use and stops it at exit. A process killed with SIGKILL runs no exit handler, and the
server would live on, orphaned. :func:`start_local_server` starts that server up front and
ties it to this process with a watchdog: a tiny child, started before the server, that reads
the server's pid from a pipe whose only writer is this process. When this process ends,
however it ends, the kernel closes the pipe and the watchdog stops the server (SIGTERM,
then SIGKILL) and exits. The pid is sent the moment the server process exists, before it is
ready, so a kill during its start-up is covered too.

It also serialises the server's first start on a fresh ``PREFECT_HOME`` (the database
migration), so runs started at the same instant on a new machine do not race on it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

from icd.storage.locks import file_lock

# Runs in the watchdog process: read pids (one a line) until EOF on stdin (this process
# died or exited), then stop each one that still names a server.
_WATCHDOG = r"""
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
pids = [int(line) for line in sys.stdin.buffer if line.strip()]
def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
    except OSError:
        return False
    return state != "Z" and b"uvicorn" in cmd
for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
    for pid in pids:
        if alive(pid):
            try:
                os.kill(pid, sig)
            except OSError:
                pass
    end = time.monotonic() + wait
    while any(alive(pid) for pid in pids) and time.monotonic() < end:
        time.sleep(0.05)
"""


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
        tie = Watchdog()
        stop = threading.Event()

        def report() -> None:  # send each server process's pid as soon as it exists
            while not stop.is_set():
                process = server.server_process
                if process is not None:
                    tie.guard(process.pid)
                stop.wait(0.005)

        watcher = threading.Thread(target=report, name="icd-server-watch", daemon=True)
        watcher.start()
        try:
            home = Path(PREFECT_HOME.value())
            ready = home / f".icd-server-ready-{prefect.__version__}"
            if ready.exists():
                server.start()
            else:  # first start on this PREFECT_HOME: one process migrates, the others wait
                with file_lock(home / ".icd-server.lock"):
                    server.start()
                    ready.touch()
        finally:
            stop.set()
            watcher.join()
        if server.server_process is not None:
            tie.guard(server.server_process.pid)
    return server.server_process.pid if server.server_process is not None else None


class Watchdog:
    """A child process that stops the processes it is told to guard once this process has
    ended (see the module doc). One per process is enough; each pid is sent once."""

    _writer: int | None = None
    _sent: set[int] = set()

    def __init__(self) -> None:
        if Watchdog._writer is not None:
            return
        read, write = os.pipe()  # both ends non-inheritable: no other child holds the writer
        try:
            subprocess.Popen(
                [sys.executable, "-S", "-c", _WATCHDOG],
                stdin=read,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        finally:
            os.close(read)
        # Kept open for the life of this process: its closing is the watchdog's signal.
        Watchdog._writer = write

    def guard(self, pid: int) -> None:
        if pid not in Watchdog._sent and Watchdog._writer is not None:
            Watchdog._sent.add(pid)
            os.write(Watchdog._writer, f"{pid}\n".encode())
