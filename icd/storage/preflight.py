"""Checks that a run's storage is usable, in seconds, before any model is loaded.

Each failure is a :class:`StorageError` with a one-line message naming the config key.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from icd.config import StorageConfig
from icd.errors import one_line

CONNECT_TIMEOUT_S = 5.0


class StorageError(ValueError):
    """A storage root, pool URI or tracking URI that cannot be used (one-line message)."""


def check_storage(storage: StorageConfig) -> None:
    """Raise :class:`StorageError` unless the root, the task cache, the pool and the
    tracking store can be written / reached."""
    writable_folder("storage.root", Path(storage.root))
    writable_folder("storage.cache_dir", storage.resolved_cache_dir())
    pool = storage.resolved_pool_uri()
    if "://" not in pool or pool.startswith("file://"):
        writable_folder("storage.pool_uri", Path(pool.removeprefix("file://")))
    else:
        _reachable_pool(pool)
    tracking = storage.resolved_tracking_uri()
    if tracking.startswith("sqlite:///"):
        writable_folder("storage.tracking_uri", Path(tracking.removeprefix("sqlite:///")).parent)
    elif tracking.startswith(("http://", "https://")):
        _reachable_http("storage.tracking_uri", tracking)


def writable_folder(key: str, path: Path) -> None:
    """Create ``path`` if needed and check a file can be written in it."""
    path = path.expanduser().absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".icd-write-check-{os.getpid()}-{threading.get_ident()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        reason = e.strerror or type(e).__name__
        if isinstance(e, FileExistsError) or (path.exists() and not path.is_dir()):
            reason = "it is a file, not a folder"
        elif isinstance(e, NotADirectoryError):
            reason = "a parent of it is a file, not a folder"
        raise StorageError(f"{key} {str(path)!r} is not usable: {reason}") from None


def _reachable_http(key: str, url: str) -> None:
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "", port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise StorageError(f"{key} {url!r} cannot be reached: {reason}") from None


def _reachable_pool(uri: str) -> None:
    """Open a remote LanceDB URI (list its tables) within :data:`CONNECT_TIMEOUT_S`."""
    outcome: dict[str, Any] = {}

    def probe() -> None:
        try:
            import lancedb

            lancedb.connect(uri).table_names()
        except Exception as e:  # any failure is reported as one line
            outcome["error"] = e

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(CONNECT_TIMEOUT_S)
    if thread.is_alive():
        raise StorageError(
            f"storage.pool_uri {uri!r} cannot be reached (no answer in {CONNECT_TIMEOUT_S:g} s)"
        )
    if "error" in outcome:
        reason = one_line(outcome["error"], limit=200)
        raise StorageError(f"storage.pool_uri {uri!r} cannot be opened: {reason}")
