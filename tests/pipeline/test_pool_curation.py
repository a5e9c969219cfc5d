"""Pool curation in the stream flow: a capped pool, the label audit, resume, accounting."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lancedb
import mlflow
import polars as pl
import pytest

from icd.storage.pool import DemoPool, inspect_pool
from icd.storage.tracking import metric_key
from tests.pipeline.test_stream import _pool_rows, _run, kill_and_resume

pytestmark = pytest.mark.slow

CAPPED = (
    "data.limit=192",
    "pipeline.chunk_size=32",
    "method.policy.budget=0.3",
    "method.pool.max_rows=6",
    "seed=3",
)


def _manifest(run_dir: Path) -> dict[int, int]:
    """chunk -> pool version, from the run's last committed state."""
    states = sorted((run_dir / "state").glob("chunk-*.json"))
    return {int(c): int(v) for c, v in json.loads(states[-1].read_text())["manifest"].items()}


def _pools_by_chunk(root: Path, run_id: str) -> dict[int, list[tuple[str, str]]]:
    """The run's selectable pool after each chunk's commit, checked out at its version."""
    pool = DemoPool(root / "pool")
    return {
        c: sorted(zip(map(str, v.ids), map(str, v.labels), strict=True))
        for c, v in (
            (c, pool.checkout(version, run_id=run_id))
            for c, version in _manifest(root / "runs" / run_id).items()
        )
    }


def _committed(run_dir: Path) -> list[tuple[int, float | None, dict[str, int]]]:
    """Per committed chunk: the pool's size and label precision, and the curation counters."""
    out = []
    for path in sorted((run_dir / "state").glob("chunk-*.json")):
        st = json.loads(path.read_text())
        counters = {k: v for k, v in st["counters"].items() if k.startswith("pool_")}
        out.append((st["pool_size"], st["pool_precision"], counters))
    return out


def _mlflow_metrics(root: Path, summary: dict[str, Any]) -> dict[str, float]:
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    return client.get_run(summary["mlflow_run_id"]).data.metrics


@pytest.mark.parametrize("evict", ["oldest", "redundant"])
def test_a_capped_pool_never_exceeds_max_rows_and_demos_come_from_the_live_pool(
    tmp_path: Path, evict: str
) -> None:
    summary = _run(tmp_path, "capped", *CAPPED, f"method.pool.evict={evict}")
    run_dir = Path(summary["run_dir"])
    preds = pl.read_parquet(run_dir / "predictions.parquet")
    accepted = int(preds["accepted"].sum())
    assert accepted > 6 and summary["samples"] == 192
    by_chunk = _pools_by_chunk(tmp_path, "capped")
    assert by_chunk and all(len(rows) <= 6 for rows in by_chunk.values())
    # every demo a chunk showed was in the pool the previous chunk left
    live: set[str] = set()
    for c in range(6):
        if c - 1 in by_chunk:
            live = {sid for sid, _ in by_chunk[c - 1]}
        shown = {d for ids in preds.filter(pl.col("chunk") == c)["demo_ids"] for d in ids}
        assert shown <= live, c
    # the table keeps evicted rows, marked; the numbers agree everywhere
    stored = _pool_rows(tmp_path, "capped")
    assert stored.height == accepted
    reasons = stored["excluded_reason"].drop_nulls()
    assert set(reasons) == {f"evicted_{evict}"}
    assert summary["pool_evicted"] == reasons.len() == accepted - summary["pool_size"]
    assert summary["pool_size"] == 6 and summary["pool_excluded"] == 0
    logged = _mlflow_metrics(tmp_path, summary)
    assert logged[metric_key("pool_evicted")] == summary["pool_evicted"]
    assert logged[metric_key("pool_size")] == 6
    assert logged[metric_key("pool_precision")] == pytest.approx(summary["pool_precision"])
    info = inspect_pool(str(tmp_path / "pool"), "capped")
    assert (info["rows"], info["live"], info["evicted"]) == (accepted, 6, summary["pool_evicted"])
    if evict == "oldest":  # the newest six stay
        newest = stored.sort("stream_pos").tail(6)["sample_id"].to_list()
        assert sorted(sid for sid, _ in by_chunk[max(by_chunk)]) == sorted(newest)


def test_the_label_audit_raises_the_pools_label_precision(tmp_path: Path) -> None:
    """A noisy oracle (30% wrong labels, one answer each, no vote to fix them): the audit
    excludes demos whose neighbours carry another label, and the pool left for selection
    is more often right."""
    noisy = (
        "data.limit=512",
        "pipeline.chunk_size=64",
        "models.teacher.backend=oracle",
        "models.teacher.noise=0.3",
        "method.voting.n=1",
        "method.voting.include_greedy=false",
        "method.policy.budget=0.3",
        "seed=7",
    )
    plain = _run(tmp_path, "plain", *noisy)
    audited = _run(tmp_path, "audited", *noisy, "method.pool.audit=true")
    assert plain["pool_excluded"] == 0 and plain["pool_precision"] < 0.85
    assert audited["pool_excluded"] > 0
    assert audited["pool_precision"] > plain["pool_precision"] + 0.05
    stored = _pool_rows(tmp_path, "audited")
    assert set(stored["excluded_reason"].drop_nulls()) == {"label_audit"}
    assert audited["pool_size"] == stored.height - audited["pool_excluded"]
    # precision counts only the selectable rows: recompute it from the table and the truth
    preds = pl.read_parquet(Path(audited["run_dir"]) / "predictions.parquet")
    truth = dict(zip(preds["sample_id"], preds["answers"].list.first(), strict=True))
    live = stored.filter(pl.col("excluded_chunk").is_null())
    right = sum(truth[s] == lbl for s, lbl in zip(live["sample_id"], live["label"], strict=True))
    assert audited["pool_precision"] == pytest.approx(right / live.height)


def test_sigkill_then_resume_gives_the_same_curated_pool(tmp_path: Path) -> None:
    sets = [
        "data.limit=320",
        "pipeline.chunk_size=32",
        "seed=5",
        "pipeline.cache=false",
        "method.policy.budget=0.25",
        "method.pool.max_rows=12",
        "method.pool.evict=redundant",
        "method.pool.audit=true",
        "models.teacher.backend=oracle",
        "models.teacher.noise=0.3",
        "method.voting.n=1",  # no vote to clean the noise: the pool's precision varies
        "method.voting.include_greedy=false",
    ]
    reference = _run(tmp_path / "ref", "ref", *sets)
    assert reference["pool_evicted"] > 0 and reference["pool_excluded"] > 0
    root = tmp_path / "killed"
    kill_and_resume(root, "victim", sets)
    summary = json.loads((root / "runs" / "victim" / "summary.json").read_text())
    # the pool after every chunk, as checked out at the version the run recorded
    assert _pools_by_chunk(root, "victim") == _pools_by_chunk(tmp_path / "ref", "ref")
    marks = ["sample_id", "label", "chunk", "excluded_chunk", "excluded_reason"]

    def table(root: Path, run_id: str) -> pl.DataFrame:
        return _pool_rows(root, run_id).select(marks).sort("sample_id")

    assert table(root, "victim").equals(table(tmp_path / "ref", "ref"))
    df = pl.read_parquet(root / "runs" / "victim" / "predictions.parquet")
    ref_df = pl.read_parquet(Path(reference["run_dir"]) / "predictions.parquet")
    cols = ["sample_id", "queried", "teacher_label", "demo_ids", "final_answer", "score"]
    assert df.select(cols).equals(ref_df.select(cols))
    for key in ("pool_size", "pool_evicted", "pool_excluded", "pool_precision"):
        assert summary[key] == reference[key], key
    # the pool's numbers after every chunk, before and after the kill
    assert _committed(root / "runs" / "victim") == _committed(Path(reference["run_dir"]))
    assert lancedb.connect(str(root / "pool")).open_table("demos").count_rows() == len(
        table(root, "victim")
    )
