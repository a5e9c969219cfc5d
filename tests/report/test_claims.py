"""The claims report: per-claim numbers are means ± std over stream orders of the runs of
the benchmark folders, and "holds" is the claim's comparison on those means."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from icd.report.claims import build_claims


def _bench(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True)
    pl.DataFrame(rows).write_parquet(folder / "runs.parquet")
    return folder


def _row(variant: str, seed: int, accuracy: float, budget: float | None = 0.08) -> dict:
    return {"variant": variant, "budget": budget, "seed": seed, "error": None,
            "run_dir": None, "accuracy": accuracy, "annotation_rate": 0.08}  # fmt: skip


def test_a_claim_holds_on_the_means_over_orders_and_shows_their_spread(tmp_path: Path) -> None:
    rows = [_row("student_zero_shot", s, 0.30 + 0.01 * s, None) for s in range(3)]
    rows += [_row("icd", s, 0.50 + 0.02 * s) for s in range(3)]
    rows += [_row("icd_random_gate", s, 0.60) for s in range(3)]  # the gate loses here
    table, claims = build_claims([_bench(tmp_path / "b", rows)])
    by_topic = {topic: (measured, ok) for topic, _, measured, ok in claims}
    measured, ok = by_topic["ICD vs the student alone"]
    assert ok and "student 31.0 ± 1.0 → ICD 52.0 ± 2.0" in measured
    assert by_topic["Uncertainty gating"][1] is False
    assert "Stream orders per setting: 3" in table and "| Uncertainty gating |" in table
    # a failed run is left out of the means
    failed = [{**_row("icd", 3, 0.0), "error": "boom"}]
    _, again = build_claims([_bench(tmp_path / "c", rows + failed)])
    assert dict((t, m) for t, _, m, _ in again)["ICD vs the student alone"] == measured
