"""Per-sample prediction tables (one parquet file per chunk).

A run's predictions live in ``RUN_DIR/predictions/chunk-NNNNN.parquet``. Each file is
written to a temporary name and renamed into place, so a killed run never leaves a half
file: a chunk's file either exists complete or not at all.
"""

from __future__ import annotations

import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union, cast, get_args, get_origin, get_type_hints

import polars as pl

from icd.method.accounting import SOURCES
from icd.method.types import PredictionRow
from icd.storage.locks import atomic_file

_POLARS: dict[Any, pl.DataType] = {
    str: pl.String(),
    int: pl.Int64(),
    float: pl.Float64(),
    bool: pl.Boolean(),
    list[str]: pl.List(pl.String),
}


def _column(hint: Any) -> tuple[pl.DataType, bool]:
    """The polars type of a :class:`PredictionRow` field's annotation, and whether it may
    be null."""
    if get_origin(hint) in (Union, types.UnionType):
        (inner,) = (a for a in get_args(hint) if a is not type(None))
        return _POLARS[inner], True
    return _POLARS[hint], False


_COLUMNS = {name: _column(hint) for name, hint in get_type_hints(PredictionRow).items()}
PREDICTION_SCHEMA = pl.Schema({name: dtype for name, (dtype, _) in _COLUMNS.items()})
# Columns that may be null; all others are required.
NULLABLE = frozenset(name for name, (_, nullable) in _COLUMNS.items() if nullable)
FINAL_SOURCES = frozenset(SOURCES)
_PREDICTIONS = "predictions"


def chunk_path(run_dir: Path, chunk_index: int) -> Path:
    """Where chunk ``chunk_index``'s predictions are stored."""
    return Path(run_dir) / _PREDICTIONS / f"chunk-{chunk_index:05d}.parquet"


def predictions_frame(records: Sequence[Mapping[str, object]]) -> pl.DataFrame:
    """Prediction rows (:class:`PredictionRow`, checked here) -> a DataFrame with exactly
    :data:`PREDICTION_SCHEMA`.

    Raises ``ValueError`` (one line) on an unknown column, a missing required value or an
    unknown ``final_source``.
    """
    columns = set(PREDICTION_SCHEMA.names())
    for i, rec in enumerate(records):
        unknown = sorted(set(rec) - columns)
        if unknown:
            raise ValueError(f"prediction record {i}: unknown column {unknown[0]!r}")
        for name in PREDICTION_SCHEMA.names():
            if name not in NULLABLE and rec.get(name) is None:
                raise ValueError(
                    f"prediction record {i} (sample_id={rec.get('sample_id')!r}): "
                    f"missing value for {name!r}"
                )
        source = rec.get("final_source")
        if source is not None and source not in FINAL_SOURCES:
            raise ValueError(f"prediction record {i}: unknown final_source {source!r}")
    data = {name: [rec.get(name) for rec in records] for name in PREDICTION_SCHEMA.names()}
    return pl.DataFrame(data, schema=PREDICTION_SCHEMA)


def write_chunk_predictions(
    run_dir: Path, chunk_index: int, records: Sequence[Mapping[str, object]]
) -> Path:
    """Write one chunk's prediction records to its parquet file, atomically (temporary
    file + rename); an existing file for the chunk is replaced. Returns the path."""
    path = chunk_path(run_dir, chunk_index)
    df = predictions_frame(records)
    with atomic_file(path) as tmp:
        df.write_parquet(tmp)
    return path


def completed_chunks(run_dir: Path) -> set[int]:
    """Indices of the chunks whose predictions file exists."""
    folder = Path(run_dir) / _PREDICTIONS
    if not folder.is_dir():
        return set()
    return {int(p.stem.split("-")[1]) for p in folder.glob("chunk-*.parquet")}


def read_predictions(run_dir: Path) -> pl.DataFrame:
    """All of a run's predictions, sorted by ``stream_pos`` (an empty frame with the schema
    when there are none)."""
    folder = Path(run_dir) / _PREDICTIONS
    files = sorted(folder.glob("chunk-*.parquet")) if folder.is_dir() else []
    if not files:
        return pl.DataFrame(schema=PREDICTION_SCHEMA)
    df = pl.concat([_with_all_columns(pl.read_parquet(f)) for f in files], how="vertical")
    return df.select(PREDICTION_SCHEMA.names()).sort("stream_pos")


def _with_all_columns(df: pl.DataFrame) -> pl.DataFrame:
    """A chunk file written before a nullable column existed gets it as nulls."""
    missing = [c for c in PREDICTION_SCHEMA.names() if c not in df.columns and c in NULLABLE]
    return df.with_columns(pl.lit(None, PREDICTION_SCHEMA[c]).alias(c) for c in missing)


def prediction_rows(df: pl.DataFrame) -> list[PredictionRow]:
    """The rows of a predictions table (one with :data:`PREDICTION_SCHEMA`)."""
    return cast("list[PredictionRow]", df.select(PREDICTION_SCHEMA.names()).to_dicts())
