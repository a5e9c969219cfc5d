"""Serialising store creation across processes (and threads) with an exclusive file lock.

Creating an MLflow SQLite store, a LanceDB table or Prefect's database is not safe when two
processes do it at once (see STACK-NOTES); once created, concurrent use is. Creation is
therefore done under :func:`file_lock` on a lock file next to the store. ``flock`` locks are
released by the kernel when their holder dies, so a killed run never leaves a stale lock.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_THREAD_LOCKS: dict[str, threading.Lock] = {}
_GUARD = threading.Lock()


def _thread_lock(path: str) -> threading.Lock:
    with _GUARD:
        return _THREAD_LOCKS.setdefault(path, threading.Lock())


@contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created with its folder if missing) across
    threads of this process and across processes."""
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    with _thread_lock(str(path)):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
