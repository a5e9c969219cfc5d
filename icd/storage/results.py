"""Per-sample prediction tables (one parquet file per chunk).

A run's predictions live in ``RUN_DIR/predictions/chunk-NNNNN.parquet``. Each file is
written to a temporary name and renamed into place, so a killed run never leaves a half
file: a chunk's file either exists complete or not at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from icd.method.accounting import SOURCES
from icd.storage.locks import atomic_file

PREDICTION_SCHEMA = pl.Schema(
    {
        "run_id": pl.String,
        "mode": pl.String,
        "dataset": pl.String,
        "sample_id": pl.String,
        "chunk": pl.Int64,
        "stream_pos": pl.Int64,
        "question": pl.String,
        "answers": pl.List(pl.String),
        "skip_reason": pl.String,
        "zs_answer": pl.String,
        "zs_uncertainty": pl.Float64,
        "zs_prompt_tokens": pl.Int64,
        "queried": pl.Boolean,
        "teacher_votes": pl.List(pl.String),
        "teacher_label": pl.String,
        "agreement": pl.Float64,
        "accepted": pl.Boolean,
        "teacher_error": pl.String,
        "demo_ids": pl.List(pl.String),
        "demo_labels": pl.List(pl.String),
        "demo_accuracy": pl.Float64,
        "icl_answer": pl.String,
        "icl_gated": pl.Boolean,  # the ICL gate kept the zero-shot answer (no second pass)
        "icl_uncertainty": pl.Float64,
        "icl_prompt_tokens": pl.Int64,
        "student_error": pl.String,
        "final_answer": pl.String,
        "final_source": pl.String,
        "score": pl.Float64,
        # What the same run's baselines would have scored on the sample: the student alone,
        # forwarding the teacher's label (else the zero-shot answer), the ICL answer.
        "zs_score": pl.Float64,
        "forward_score": pl.Float64,
        "icl_score": pl.Float64,
    }
)
# Columns that may be null ("str?" / "float?" in the contract); all others are required.
NULLABLE = frozenset(
    {
        "skip_reason",
        "zs_answer",
        "zs_uncertainty",
        "zs_prompt_tokens",
        "teacher_label",
        "agreement",
        "teacher_error",
        "demo_accuracy",
        "icl_answer",
        "icl_gated",
        "icl_uncertainty",
        "icl_prompt_tokens",
        "student_error",
        "final_answer",
        "final_source",
        "score",
        "zs_score",
        "forward_score",
        "icl_score",
    }
)
FINAL_SOURCES = frozenset(SOURCES)
_PREDICTIONS = "predictions"


def chunk_path(run_dir: Path, chunk_index: int) -> Path:
    """Where chunk ``chunk_index``'s predictions are stored."""
    return Path(run_dir) / _PREDICTIONS / f"chunk-{chunk_index:05d}.parquet"


def predictions_frame(records: list[dict[str, Any]]) -> pl.DataFrame:
    """Records -> a DataFrame with exactly :data:`PREDICTION_SCHEMA`.

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


def write_chunk_predictions(run_dir: Path, chunk_index: int, records: list[dict[str, Any]]) -> Path:
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
