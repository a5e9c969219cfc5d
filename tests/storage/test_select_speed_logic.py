"""The selection benchmark's logic on a tiny pool (speed itself is only reported, never asserted)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from icd.bench.select import print_select_bench, run_select_bench


def test_bench_measures_every_path_and_compaction(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    df = run_select_bench(
        sizes=(300,),
        dim=32,
        batch=16,
        k=4,
        commits=6,
        compact_every=3,
        budget_s=0.02,
        root=tmp_path,
    )
    (row,) = df.to_dicts()
    assert row["pool_size"] == 300
    assert row["topk_agreement"] == 1.0  # the production path returns brute force's top-k
    for key in ("brute_ms", "rices_ms", "combined_ms", "combined_brute_ms", "lancedb_ms"):
        assert math.isfinite(row[key]) and row[key] > 0
    for key in ("rices_ratio", "combined_ratio", "combined_vs_matched", "lancedb_ratio"):
        assert math.isfinite(row[key]) and row[key] > 0
    assert row["rounds"] >= 7
    assert row["fragments_no_compaction"] >= 6
    assert row["fragments_compacted"] < row["fragments_no_compaction"]
    assert row["upsert_ms_per_row"] > 0
    assert list(tmp_path.iterdir()) == []  # the temporary pools are removed
    print_select_bench(df)
    out = capsys.readouterr().out
    assert "300" in out and "upsert ms/row" in out
