"""Storage: the LanceDB demonstration pool, MLflow lineage and prediction tables.

``Tracker`` is imported lazily (MLflow takes seconds to import).
"""

from __future__ import annotations

from typing import Any

from icd.storage.pool import DemoPool, PoolError, PoolView
from icd.storage.results import (
    PREDICTION_SCHEMA,
    completed_chunks,
    read_predictions,
    summarize,
    write_chunk_predictions,
)

__all__ = [
    "PREDICTION_SCHEMA",
    "DemoPool",
    "PoolError",
    "PoolView",
    "Tracker",
    "TrackingError",
    "completed_chunks",
    "read_predictions",
    "summarize",
    "write_chunk_predictions",
]


def __getattr__(name: str) -> Any:
    if name in ("Tracker", "TrackingError"):
        from icd.storage import tracking

        return getattr(tracking, name)
    raise AttributeError(f"module 'icd.storage' has no attribute {name!r}")
