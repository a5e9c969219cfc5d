"""The overhead bench at a tiny size: its plain loop is the flow's algorithm (same answers),
and its table has the columns the printer reads."""

from __future__ import annotations

import polars as pl
import pytest
from rich.console import Console

from icd.bench.overhead import print_overhead_bench, run_overhead_bench

pytestmark = pytest.mark.slow


def test_overhead_bench_loop_matches_flow_and_prints() -> None:
    df = run_overhead_bench(
        samples=64, chunk_size=32, rss_samples=(), larger_chunks=(64,), rounds=1
    )
    assert set(df.columns) >= {
        "config",
        "samples",
        "chunk_size",
        "seconds",
        "samples_per_s",
        "ratio",
        "cpu_s",
        "cpu_ratio",
        "same",
        "s_icl",
    }
    got = {(r["config"], r["chunk_size"]) for r in df.iter_rows(named=True)}
    assert got == {("loop", 32), ("flow L0", 32), ("flow L2", 32), ("loop", 64), ("flow L0", 64)}
    flows = df.filter(pl.col("config") != "loop")
    # The loop reproduces every flow run's final answers, sample by sample.
    assert flows["same"].to_list() == [True, True, True]
    assert (df["samples"] == 64).all() and (
        df.filter(pl.col("config") == "loop")["ratio"] == 1
    ).all()
    console = Console(record=True, width=160)
    print_overhead_bench(df, console)
    text = console.export_text()
    assert "flow L2" in text and "ratio" in text


def test_student_bench_compares_backends_on_the_same_prompts() -> None:
    from icd.bench.student import print_student_bench, run_student_bench

    rows = run_student_bench(prompts=16, batch_size=8)
    assert [r["backend"] for r in rows][:3] == ["hf", "hf + image cache", "hf + image cache, warm"]
    assert len(rows) == 5
    assert all(r["same_answers"] == 1.0 and r["prompts_per_s"] > 0 for r in rows)
    for r in rows[3:]:
        assert r["entropy_lower_bound"] and r["entropy_spearman"] > 0.5
    plain, cached, warm = rows[:3]
    assert 0 < plain["processor_share"] < 1 and plain["cache_hit_rate"] is None
    assert cached["cache_hit_rate"] > 0  # demos repeat across prompts: processed once
    assert warm["cache_hit_rate"] == 1.0
    print_student_bench(rows)


def test_processor_bench_shows_real_size_preprocessing_with_the_same_outputs() -> None:
    from icd.bench.student import print_processor_bench, run_processor_bench

    rows = run_processor_bench(prompts=2, k=1)
    assert [r["processor"] for r in rows] == ["no cache", "image cache", "image cache, warm"]
    assert all(r["same_outputs"] and r["images_per_s"] > 0 for r in rows)
    print_processor_bench(rows)


def test_select_bench_ann_section_at_a_tiny_size() -> None:
    from icd.bench.select import print_ann_bench, run_ann_bench

    df = run_ann_bench(sizes=(2_000,), dim=32, ann_min_rows=500, budget_s=0.02, min_rounds=2)
    assert df["data"].to_list() == ["random", "clustered"]
    assert (df["trained_on"] == 2_000).all() and (df["lists"] > 1).all()
    for name in ("rices", "combined", "cascade"):
        assert df[f"{name}_recall"].is_between(0, 1).all()
    # Clustered vectors are what an index is for: it finds most of the exact demos.
    clustered = df.filter(pl.col("data") == "clustered").row(0, named=True)
    assert clustered["rices_recall"] >= 0.9 and clustered["combined_recall"] >= 0.9
    assert (df["index_mb"] > 0).all() and (df["build_s"] > 0).all()
    assert (df["rices_ratio"] > 0).all() and (df["rounds"] >= 2).all()
    console = Console(record=True, width=200)
    print_ann_bench(df, console)
    assert "recall rices" in console.export_text()
