"""The captioning task end to end: the stream flow on the shapes fixture read as captions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lancedb
import mlflow
import polars as pl
import pytest

from icd.config import load_config
from icd.flows.stream import stream
from icd.method.metrics import caption_bleu, caption_tokenizer, corpus_bleu, corpus_cider
from icd.method.voting import caption_similarity

pytestmark = pytest.mark.slow


def _run(root: Path, run_id: str, *sets: str) -> dict[str, Any]:
    cfg = load_config(
        "smoke",
        overrides=[
            f"storage.root={root}",
            "data.dataset=shapes_captions",
            "data.limit=64",
            "pipeline.chunk_size=32",
            "pipeline.cache=false",
            "method.policy.budget=0.15",
            *sets,
        ],
    )
    return stream(config_json=cfg.model_dump_json(), run_id=run_id)


def _pool_labels(root: Path, run_id: str) -> dict[str, str]:
    tbl = lancedb.connect(str(root / "pool")).open_table("demos")
    rows = pl.from_arrow(tbl.to_arrow()).filter(pl.col("run_id") == run_id)
    return dict(zip(rows["sample_id"], rows["label"], strict=True))


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("captions")


@pytest.fixture(scope="module")
def teacher_run(root: Path) -> tuple[dict[str, Any], pl.DataFrame]:
    summary = _run(root, "cap-hf")
    return summary, pl.read_parquet(Path(summary["run_dir"]) / "predictions.parquet")


def test_captioning_run_writes_predictions_and_corpus_metrics(
    root: Path, teacher_run: tuple[dict[str, Any], pl.DataFrame]
) -> None:
    summary, df = teacher_run
    assert df.height == 64 and df["stream_pos"].to_list() == list(range(64))
    valid = df.filter(pl.col("skip_reason").is_null())
    assert valid.height == 64  # corrupt_every=100: none in the first 64
    assert all(len(a) == 5 for a in valid["answers"])  # the five reference captions
    # Per-sample score: the sentence-BLEU proxy of the final caption against its references.
    for final, refs, s in valid.select("final_answer", "answers", "score").iter_rows():
        assert s == pytest.approx(caption_bleu(final, refs) / 100)
    assert summary["accuracy"] == pytest.approx(valid["score"].mean())
    # Corpus metrics (the COCO caption evaluation), recomputed from the predictions table,
    # with the PTB tokenizer the run names (ptb-java where java is on PATH)
    assert summary["caption_tokenizer"] == caption_tokenizer()
    finals, refs = valid["final_answer"].to_list(), valid["answers"].to_list()
    assert summary["bleu"] == pytest.approx(corpus_bleu(finals, refs))
    assert summary["bleu1"] == pytest.approx(corpus_bleu(finals, refs, max_order=1))
    assert summary["cider"] == pytest.approx(corpus_cider(finals, refs))
    assert summary["bleu4"] == summary["bleu"]
    assert summary["cider"] > 0 and summary["bleu1"] > 0
    assert summary["zs_cider"] == pytest.approx(corpus_cider(valid["zs_answer"].to_list(), refs))
    # ... and logged to MLflow with the rest of the summary.
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    metrics = client.get_run(summary["mlflow_run_id"]).data.metrics
    assert metrics["cider"] == pytest.approx(summary["cider"])
    assert metrics["bleu1"] == pytest.approx(summary["bleu1"])


def test_teacher_captions_are_voted_by_consensus_and_feed_the_pool(
    root: Path, teacher_run: tuple[dict[str, Any], pl.DataFrame]
) -> None:
    summary, df = teacher_run
    queried = df.filter(pl.col("queried"))
    assert 0 < queried.height <= int(0.15 * 64)
    assert summary["teacher_calls"] == 5 * queried.height
    for votes, label, agreement in queried.select(
        "teacher_votes", "teacher_label", "agreement"
    ).iter_rows():
        assert len(votes) == 5 and label in votes
        # agreement = the label's mean similarity to the other four sampled captions
        i = votes.index(label)
        others = [v for j, v in enumerate(votes) if j != i]
        assert agreement == pytest.approx(sum(caption_similarity(label, v) for v in others) / 4)
        best = max(
            sum(caption_similarity(v, w) for k, w in enumerate(votes) if k != j) / 4
            for j, v in enumerate(votes)
        )
        assert agreement == pytest.approx(best)  # no sampled caption is closer to the rest
    pool = _pool_labels(root, "cap-hf")
    accepted = queried.filter(pl.col("accepted"))
    assert pool == dict(zip(accepted["sample_id"], accepted["teacher_label"], strict=True))
    # Demonstrations come from the pool and carry its captions as their answers.
    demos = df.filter(pl.col("demo_ids").list.len() > 0)
    assert demos.height > 0
    for ids, labels in demos.select("demo_ids", "demo_labels").iter_rows():
        assert [pool[d] for d in ids] == labels


def test_oracle_captions_reach_the_student_as_demonstrations(root: Path) -> None:
    """With the oracle teacher the pool holds reference captions ("a red star", written
    out), and every ICL prompt shows them."""
    summary = _run(root, "cap-oracle", "models.teacher.backend=oracle")
    df = pl.read_parquet(Path(summary["run_dir"]) / "predictions.parquet")
    queried = df.filter(pl.col("queried"))
    assert queried.height > 0 and queried["accepted"].all()
    for label, refs in queried.select("teacher_label", "answers").iter_rows():
        assert label == refs[0] and label.startswith("a ")
    assert queried["agreement"].to_list() == [1.0] * queried.height
    # The forwarded reference caption scores BLEU 100 on its own sample.
    assert queried["score"].to_list() == pytest.approx([1.0] * queried.height)
    pool = set(_pool_labels(root, "cap-oracle").values())
    with_demos = df.filter(pl.col("demo_labels").list.len() > 0)
    assert with_demos.height > 0
    assert {d for ls in with_demos["demo_labels"] for d in ls} <= pool
    assert summary["cider"] > 0
