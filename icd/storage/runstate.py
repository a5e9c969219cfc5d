"""A run's durable progress: which chunks are committed and the state after each.

A chunk is committed when ``state/chunk-NNNNN.json`` exists; it is written last (after the
chunk's predictions parquet and pool commit), atomically, so a run killed at any point
resumes from the chunk after the last committed one with exactly the policy state,
counters and pool version it had there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from icd.jsontypes import JSONObject
from icd.storage.locks import atomic_write_text

if TYPE_CHECKING:
    from icd.config import Config

__all__ = ["RunState", "atomic_write_text", "check_resume", "resume_fingerprint"]


class RunState:
    """Committed chunk states of one run, kept under ``run_dir/state``."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.dir = run_dir / "state"

    def _path(self, chunk: int) -> Path:
        return self.dir / f"chunk-{chunk:05d}.json"

    def commit(self, chunk: int, state: JSONObject) -> None:
        """Mark ``chunk`` committed with its state (policy state, counters, pool version):
        a JSON object the caller reads back and validates (this class does not look in)."""
        atomic_write_text(self._path(chunk), json.dumps({"chunk": chunk, **state}, sort_keys=True))

    def committed(self) -> list[int]:
        """Indices of committed chunks, ascending."""
        if not self.dir.exists():
            return []
        return sorted(int(p.stem.split("-")[1]) for p in self.dir.glob("chunk-*.json"))

    def load(self, chunk: int) -> JSONObject:
        return json.loads(self._path(chunk).read_text())

    def last(self) -> JSONObject | None:
        """State after the last committed chunk, or None for a fresh run."""
        done = self.committed()
        return self.load(done[-1]) if done else None

    def all(self) -> list[JSONObject]:
        return [self.load(c) for c in self.committed()]

    def check_config(self, fingerprint: str, record: bool = True) -> None:
        """Record the run's config fingerprint (unless ``record`` is False: a check only),
        or refuse (``ValueError``, one line) to resume under a different one."""
        path = self.run_dir / "config.fingerprint"
        if path.exists():
            old = path.read_text().strip()
            if old != fingerprint:
                raise ValueError(
                    f"run {self.run_dir.name!r} exists with a different configuration; "
                    "resume it with the same config or pick a new run id"
                )
        elif record:
            atomic_write_text(path, fingerprint)


def resume_fingerprint(cfg: Config) -> str:
    """What a resumed run must share with the run it continues."""
    return cfg.fingerprint("seed", "data", "models", "method", "pipeline.chunk_size")


def check_resume(cfg: Config, run_id: str | None) -> None:
    """Raise ``ValueError`` (one line) if run ``run_id`` exists under the storage root with
    another configuration; writes nothing."""
    run_id = run_id or cfg.run_id
    if run_id:
        RunState(cfg.storage.results_dir(run_id)).check_config(
            resume_fingerprint(cfg), record=False
        )
