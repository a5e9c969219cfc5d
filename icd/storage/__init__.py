"""Storage: the LanceDB demonstration pool, MLflow lineage and prediction tables.

Everything is imported lazily: LanceDB and MLflow take seconds to import, and a reader
of prediction tables (``icd report``) needs neither.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "DemoPool": "pool",
    "PoolError": "pool",
    "PoolView": "pool",
    "Tracker": "tracking",
    "TrackingError": "tracking",
    "PREDICTION_SCHEMA": "results",
    "completed_chunks": "results",
    "read_predictions": "results",
    "write_chunk_predictions": "results",
}

__all__ = [
    "PREDICTION_SCHEMA",
    "DemoPool",
    "PoolError",
    "PoolView",
    "Tracker",
    "TrackingError",
    "completed_chunks",
    "read_predictions",
    "write_chunk_predictions",
]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"icd.storage.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'icd.storage' has no attribute {name!r}")
