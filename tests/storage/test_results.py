"""Prediction tables: exact schema, atomic per-chunk parquet, resume bookkeeping."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from icd.storage.results import (
    PREDICTION_SCHEMA,
    chunk_path,
    completed_chunks,
    read_predictions,
    write_chunk_predictions,
)

# The "Predictions table" of notes/CONTRACTS.md, in order.
CONTRACT_COLUMNS = [
    "run_id",
    "mode",
    "dataset",
    "sample_id",
    "chunk",
    "stream_pos",
    "question",
    "answers",
    "skip_reason",
    "zs_answer",
    "zs_uncertainty",
    "zs_prompt_tokens",
    "queried",
    "teacher_votes",
    "teacher_label",
    "agreement",
    "accepted",
    "teacher_error",
    "demo_ids",
    "demo_labels",
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
]


def record(pos: int, **kw: object) -> dict:
    rec = {
        "run_id": "r",
        "mode": "icd",
        "dataset": "shapes",
        "sample_id": f"s{pos}",
        "chunk": pos // 4,
        "stream_pos": pos,
        "question": "What shape?",
        "answers": ["circle"],
        "zs_answer": "square",
        "zs_uncertainty": 1.2,
        "queried": False,
        "teacher_votes": [],
        "accepted": False,
        "demo_ids": ["s0", "s1"],
        "demo_labels": ["circle", "circle"],
        "demo_accuracy": 1.0,
        "icl_answer": "circle",
        "icl_uncertainty": 0.3,
        "final_answer": "circle",
        "final_source": "student_icl",
        "score": 1.0,
    }
    rec.update(kw)
    return rec


def test_schema_is_exactly_the_contract() -> None:
    assert PREDICTION_SCHEMA.names() == CONTRACT_COLUMNS
    assert PREDICTION_SCHEMA["answers"] == pl.List(pl.String)
    assert PREDICTION_SCHEMA["queried"] == pl.Boolean
    assert PREDICTION_SCHEMA["score"] == pl.Float64


def test_chunks_roundtrip_sorted_by_stream_pos(tmp_path: Path) -> None:
    write_chunk_predictions(tmp_path, 1, [record(6), record(4), record(5)])
    write_chunk_predictions(tmp_path, 0, [record(2), record(0), record(1), record(3)])
    write_chunk_predictions(tmp_path, 2, [])
    assert completed_chunks(tmp_path) == {0, 1, 2}
    df = read_predictions(tmp_path)
    assert df.schema == PREDICTION_SCHEMA
    assert df["stream_pos"].to_list() == list(range(7))
    assert df["demo_ids"][0].to_list() == ["s0", "s1"]
    assert df["skip_reason"].null_count() == 7


def test_rewriting_a_chunk_replaces_it(tmp_path: Path) -> None:
    write_chunk_predictions(tmp_path, 0, [record(0), record(1)])
    write_chunk_predictions(tmp_path, 0, [record(0, final_answer="square", score=0.0)])
    df = read_predictions(tmp_path)
    assert df["final_answer"].to_list() == ["square"]


def test_a_failed_write_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_chunk_predictions(tmp_path, 0, [record(0)])

    def broken(self: pl.DataFrame, file: str, **kw: object) -> None:
        Path(file).write_bytes(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(pl.DataFrame, "write_parquet", broken)
    with pytest.raises(OSError, match="disk full"):
        write_chunk_predictions(tmp_path, 1, [record(4)])
    monkeypatch.undo()
    assert completed_chunks(tmp_path) == {0}
    assert not chunk_path(tmp_path, 1).exists()
    assert [p.name for p in chunk_path(tmp_path, 0).parent.iterdir()] == ["chunk-00000.parquet"]
    assert len(read_predictions(tmp_path)) == 1


def test_bad_records_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown column 'colour'"):
        write_chunk_predictions(tmp_path, 0, [record(0, colour="red")])
    bad = record(0)
    del bad["queried"]
    with pytest.raises(ValueError, match="missing value for 'queried'"):
        write_chunk_predictions(tmp_path, 0, [bad])
    with pytest.raises(ValueError, match="final_source"):
        write_chunk_predictions(tmp_path, 0, [record(0, final_source="oracle")])
    assert completed_chunks(tmp_path) == set()
