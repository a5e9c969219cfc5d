"""Prediction tables: exact schema, atomic per-chunk parquet, resume bookkeeping, summary."""

from __future__ import annotations

import math
from pathlib import Path

import polars as pl
import pytest

from icd.method.metrics import corpus_bleu, corpus_cider
from icd.storage.results import (
    PREDICTION_SCHEMA,
    chunk_path,
    completed_chunks,
    predictions_frame,
    read_predictions,
    summarize,
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
    "icl_uncertainty",
    "icl_prompt_tokens",
    "student_error",
    "final_answer",
    "final_source",
    "score",
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


def test_summary_aggregates_the_table() -> None:
    recs = [
        record(0, queried=True, teacher_votes=["circle"] * 3, teacher_label="circle",
               agreement=1.0, accepted=True, final_source="teacher", demo_accuracy=None),
        record(1, queried=True, teacher_votes=["a", "b"], agreement=0.5, teacher_label="a",
               final_answer="a", score=0.0, final_source="teacher", demo_accuracy=0.5),
        record(2, zs_answer="circle", final_source="student_icl", score=1.0),
        record(3, queried=True, teacher_error="HTTP 503", final_source="student_fallback",
               score=0.0, demo_accuracy=0.0),
        record(4, skip_reason="bad image", zs_answer=None, score=None, final_answer=None,
               final_source=None, demo_ids=[], demo_labels=[], demo_accuracy=None),
    ]  # fmt: skip
    df = predictions_frame(recs)
    summary = summarize(
        df,
        {"teacher_calls": 7, "pool_size": 1, "seconds": {"embed": 2.0}},
        score_fn=lambda pred, answers: float(pred in answers),
    )
    assert summary == {
        "run_id": "r",
        "mode": "icd",
        "dataset": "shapes",
        "samples": 5,
        "skipped": 1,
        "accuracy": pytest.approx(2 / 4),
        "accuracy_queried": pytest.approx(1 / 3),
        "accuracy_not_queried": pytest.approx(1.0),
        "zs_accuracy": pytest.approx(1 / 4),
        "forward_accuracy": None,
        "annotation_rate": pytest.approx(3 / 4),
        "queried": 3,
        "accepted": 1,
        "teacher_calls": 7,
        "teacher_errors": 1,
        "student_errors": 0,
        "pool_size": 1,
        "mean_agreement": pytest.approx(0.75),
        "demo_accuracy": pytest.approx(1.5 / 3),
        "seconds": {"embed": 2.0},
        "gain_from_teacher_labels": None,
        "gain_from_icl": None,
        "zs_prompt_tokens_mean": None,
        "icl_prompt_tokens_mean": None,
        "icl_prompt_tokens_p95": None,
        "demos_per_icl_prompt": 2.0,
        "seconds_per_zs_prompt": None,
        "seconds_per_icl_prompt": None,
        "adapt_steps": 0,
        "adapt_tokens": 0,
        "adapt_flops": 0.0,
        "adapt_seconds": 0.0,
        "adapt_peak_rss_mb": None,
        "student_params": 0,
        "inference_flops": None,
        "compute_flops": None,
    }
    assert summarize(df, {"zs_accuracy": 0.9})["zs_accuracy"] == 0.9


def test_summary_gives_the_cost_of_each_student_pass() -> None:
    recs = [
        record(i, zs_prompt_tokens=10, icl_prompt_tokens=40 + 10 * i, demo_ids=["a"] * (1 + i))
        for i in range(4)
    ]
    recs[3].update(icl_answer=None, icl_prompt_tokens=None, demo_ids=[])
    s = summarize(predictions_frame(recs), {"seconds": {"score": 2.0, "icl": 3.0}})
    assert s["zs_prompt_tokens_mean"] == 10
    assert s["icl_prompt_tokens_mean"] == 50 and s["icl_prompt_tokens_p95"] == 60
    assert s["demos_per_icl_prompt"] == 2.0
    assert s["seconds_per_zs_prompt"] == 0.5 and s["seconds_per_icl_prompt"] == 1.0
    adapt = {"steps": 8, "tokens": 100, "flops": 6e5, "peak_rss_mb": 900.0}
    s = summarize(predictions_frame(recs), {"student_params": 1000, "adapt": adapt})
    tokens = 4 * 10 + (40 + 50 + 60)  # every zero-shot and ICL prompt token
    assert s["inference_flops"] == 2 * 1000 * tokens
    assert s["compute_flops"] == 6e5 + 2 * 1000 * tokens
    assert s["adapt_steps"] == 8 and s["adapt_tokens"] == 100


def test_summary_splits_gains_overall_and_per_class_group() -> None:
    # Four samples: a and b are base, c and d novel. c is queried and forwarded.
    recs = [
        record(0, answers=["a"], zs_answer="a", score=1.0),
        record(1, answers=["b"], zs_answer="x", score=0.0),
        record(2, answers=["c"], zs_answer="x", queried=True, teacher_label="c",
               final_answer="c", final_source="teacher", score=1.0),
        record(3, answers=["d"], zs_answer="x", final_answer="d", score=1.0),
    ]  # fmt: skip
    df = predictions_frame(recs)
    score = lambda pred, answers: float(pred in answers)  # noqa: E731
    s = summarize(
        df,
        {"zs_accuracy": 0.25, "forward_accuracy": 0.5},
        score,
        groups={"base": ["a", "b"], "novel": ["c", "d"]},
    )
    assert s["gain_from_teacher_labels"] == pytest.approx(0.25)
    assert s["gain_from_icl"] == pytest.approx(0.75 - 0.5)
    assert s["samples_base"] == s["samples_novel"] == 2
    assert s["accuracy_base"] == pytest.approx(0.5) and s["accuracy_novel"] == 1.0
    assert s["zs_accuracy_novel"] == 0.0 and s["forward_accuracy_novel"] == 0.5
    assert s["gain_from_teacher_labels_novel"] == 0.5 and s["gain_from_icl_novel"] == 0.5
    assert s["accuracy_not_queried_novel"] == 1.0 and s["gain_from_icl_base"] == 0.0
    # The groups add up to the whole.
    whole = (s["accuracy_base"] * 2 + s["accuracy_novel"] * 2) / 4
    assert whole == pytest.approx(s["accuracy"])


def test_summary_of_an_empty_run() -> None:
    summary = summarize(pl.DataFrame(schema=PREDICTION_SCHEMA), {"run_id": "r", "mode": "icd"})
    assert summary["samples"] == 0 and summary["accuracy"] is None
    assert summary["run_id"] == "r" and summary["annotation_rate"] == 0.0


def test_captioning_summary_adds_corpus_bleu_and_cider() -> None:
    refs = [["a b"], ["c d"], ["e f"]]
    recs = [
        record(0, answers=refs[0], final_answer="a b", zs_answer="a c", score=1.0),
        record(1, answers=refs[1], final_answer="c d", zs_answer="c d", score=1.0),
        record(2, answers=refs[2], final_answer=None, final_source=None, zs_answer=None),
        record(3, answers=["x y"], skip_reason="bad image", final_answer=None, score=None),
    ]
    df = predictions_frame(recs)
    s = summarize(df, task="captioning")
    # CIDEr-D by hand (see tests/method/test_captioning.py): three images whose n-grams
    # occur in one reference each; "a b" and "c d" match exactly: 10 * mean(1, 1, 0, 0) = 5
    # each, the missing caption 0; the skipped sample is left out.
    assert s["cider"] == pytest.approx((5.0 + 5.0 + 0.0) / 3)
    # BLEU-1: 4 of 4 words right, 4 hypothesis words vs 6 reference words: exp(1 - 6/4).
    assert s["bleu1"] == pytest.approx(100 * math.exp(1 - 6 / 4))
    assert s["bleu"] == 0.0  # no 3- or 4-grams: BLEU-4 is 0
    # The student's zero-shot captions, over the two samples it answered.
    assert s["zs_cider"] == pytest.approx(corpus_cider(["a c", "c d"], refs[:2]))
    assert s["zs_bleu1"] == pytest.approx(corpus_bleu(["a c", "c d"], refs[:2], max_order=1))
    # Other tasks get none of these.
    assert not {"bleu", "cider", "bleu1", "zs_bleu"} & set(summarize(df))
    assert not {"bleu", "cider"} & set(summarize(df, task="classification"))
