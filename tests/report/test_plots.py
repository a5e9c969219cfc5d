"""Every plot writes a valid, non-empty PNG — on realistic and on degenerate inputs."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from icd.report import plots
from icd.report.tables import comparison_table, runs_table, summary_row
from tests.report import assert_png, empty_predictions, make_predictions


def _table(rows: list[tuple[str, str, str, float | None, int, float, float]]) -> pl.DataFrame:
    """A comparison table from (dataset, variant, mode, budget, seed, accuracy, rate) runs."""
    runs = runs_table(
        summary_row(
            {"dataset": d, "variant": v, "mode": m, "budget": b, "seed": s},
            {"run_id": f"{d}-{v}-{b}-{s}", "samples": 64, "accuracy": acc, "annotation_rate": rate},
        )
        for d, v, m, b, s, acc, rate in rows
    )
    return comparison_table(runs)


FULL_TABLE = [
    (ds, v, v, b, s, 0.3 + 2 * b + 0.1 * (v == "icd") + 0.01 * s, b * (0.9 + 0.05 * s))
    for ds in ("shapes", "cub200")
    for v in ("icd", "teacher_forward")
    for b in (0.04, 0.08, 0.15)
    for s in (0, 1, 2)
] + [
    (ds, v, v, None, s, acc + 0.02 * s, rate)
    for ds in ("shapes", "cub200")
    for v, acc, rate in (("student_zero_shot", 0.3, 0.0), ("teacher_zero_shot", 0.8, 1.0))
    for s in (0, 1, 2)
]


def test_accuracy_vs_annotation_full(tmp_path):
    table = _table(FULL_TABLE)
    assert table.height == 2 * (2 * 3 + 2)
    out = plots.plot_accuracy_vs_annotation(table, tmp_path / "main.png", title="bench")
    assert out == tmp_path / "main.png"
    w, h = assert_png(out)
    assert w > h  # two dataset panels side by side


@pytest.mark.parametrize(
    "rows",
    [
        [],  # no runs at all
        [("shapes", "icd", "icd", 0.1, 0, 0.5, 0.1)],  # one point, one seed (std null)
        [
            ("shapes", "student_zero_shot", "student_zero_shot", None, 0, 0.4, 0.0)
        ],  # only a reference line
        [("shapes", "icd", "icd", 0.1, 0, float("nan"), float("nan"))],  # no accuracy values
    ],
    ids=["empty", "one-point", "only-budget-free", "nan"],
)
def test_accuracy_vs_annotation_degenerate(tmp_path, rows):
    table = _table(rows)
    assert_png(plots.plot_accuracy_vs_annotation(table, tmp_path / "sub" / "main.png"))


def test_accuracy_vs_annotation_null_accuracy(tmp_path):
    runs = runs_table(
        [
            summary_row(
                {"dataset": "shapes", "variant": "icd", "mode": "icd", "budget": 0.1, "seed": 0}, {}
            )
        ]
    )
    table = comparison_table(runs)
    assert table.get_column("accuracy_mean").is_null().all()
    assert_png(plots.plot_accuracy_vs_annotation(table, tmp_path / "main.png"))


@pytest.mark.parametrize(
    "preds",
    [
        make_predictions(n=200, chunk_size=32, skip_every=17),
        make_predictions(n=1, chunk_size=32),  # one chunk, one sample
        make_predictions(n=64, query_rate=0.0),  # nothing queried
        make_predictions(n=40, skip_every=1),  # everything skipped: no scores, no uncertainties
        empty_predictions(),
    ],
    ids=["normal", "one-sample", "no-queries", "all-skipped", "empty"],
)
def test_run_plots(tmp_path, preds):
    assert_png(plots.plot_running_curves(preds, tmp_path / "running.png", title="r", budget=0.15))
    assert_png(plots.plot_uncertainty_hist(preds, tmp_path / "unc.png", title="r"))
    assert_png(plots.plot_agreement_hist(preds, tmp_path / "agr.png", a_min=0.6, title="r"))
    assert_png(plots.plot_running_comparison(preds, tmp_path / "cmp.png", labels={"run-a": "icd"}))


def test_plots_handle_constant_and_nan_values(tmp_path):
    preds = make_predictions(n=50).with_columns(
        zs_uncertainty=pl.lit(0.7), agreement=pl.when(pl.col("queried")).then(1.0).otherwise(None)
    )
    assert_png(plots.plot_uncertainty_hist(preds, tmp_path / "unc.png"))
    assert_png(plots.plot_agreement_hist(preds, tmp_path / "agr.png"))
    nan_unc = preds.with_columns(zs_uncertainty=pl.lit(float("nan")))
    assert_png(plots.plot_uncertainty_hist(nan_unc, tmp_path / "unc-nan.png"))


def test_agreement_with_teacher_errors(tmp_path):
    """Queried samples whose teacher call failed have no agreement; the plot still renders."""
    preds = make_predictions(n=64, query_rate=0.5).with_columns(
        agreement=pl.when(pl.col("stream_pos") % 2 == 0).then(pl.col("agreement")).otherwise(None),
        teacher_error=pl.when(pl.col("stream_pos") % 2 == 1)
        .then(pl.lit("HTTP 500"))
        .otherwise(None),
    )
    assert_png(plots.plot_agreement_hist(preds, tmp_path / "agr.png", a_min=0.6))
    only_errors = preds.with_columns(agreement=pl.lit(None, dtype=pl.Float64))
    assert_png(plots.plot_agreement_hist(only_errors, tmp_path / "agr-none.png"))


def test_running_comparison_many_runs(tmp_path):
    preds = pl.concat([make_predictions(run_id=f"run-{i}", n=96, seed=i) for i in range(10)])
    labels = {f"run-{i}": f"mode {i}" for i in range(10)}
    assert_png(plots.plot_running_comparison(preds, tmp_path / "cmp.png", labels=labels, title="t"))


def test_plots_depend_on_data(tmp_path):
    """Different inputs give different images (the plot is drawn from the data)."""
    a = plots.plot_running_curves(make_predictions(seed=0), tmp_path / "a.png").read_bytes()
    b = plots.plot_running_curves(make_predictions(seed=1), tmp_path / "b.png").read_bytes()
    c = plots.plot_running_curves(make_predictions(seed=0), tmp_path / "c.png").read_bytes()
    assert a != b
    assert a == c  # and the same input gives the same file
    assert np.frombuffer(a, dtype=np.uint8).size > 5_000
