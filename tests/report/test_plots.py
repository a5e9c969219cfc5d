"""Every plot writes a valid, non-empty PNG — on realistic and on degenerate inputs."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from icd.method.accounting import RunSummary
from icd.report import plots
from icd.report.tables import comparison_table, running_curves, runs_table, summary_row
from tests.report import assert_png, empty_predictions, make_predictions


def _table(rows: list[tuple[str, str, str, float | None, int, float, float]]) -> pl.DataFrame:
    """A comparison table from (dataset, variant, mode, budget, seed, accuracy, rate) runs."""
    runs = runs_table(
        summary_row(
            {"dataset": d, "variant": v, "mode": m, "budget": b, "seed": s},
            RunSummary.from_json(
                {
                    "run_id": f"{d}-{v}-{b}-{s}",
                    "samples": 64,
                    "accuracy": acc,
                    "annotation_rate": rate,
                }
            ),
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
                {"dataset": "shapes", "variant": "icd", "mode": "icd", "budget": 0.1, "seed": 0},
                None,
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


# ---------------------------------------------------------------------------- what they show


def _legend(ax) -> list[str]:  # noqa: ANN001
    legend = ax.get_legend()
    return [t.get_text() for t in legend.get_texts()] if legend else []


def test_running_curves_say_when_queried_and_pooled_coincide():
    preds = make_predictions(n=96, seed=0)
    all_kept = preds.with_columns(pl.col("queried").alias("accepted"))
    pool_ax = plots.running_curves_figure(all_kept, title="r").axes[1]
    assert _legend(pool_ax) == ["queried = pooled (every teacher label accepted)"]
    assert len(pool_ax.get_lines()) == 1
    some_rejected = plots.running_curves_figure(preds).axes[1]
    assert preds["accepted"].sum() < preds["queried"].sum()
    assert len(some_rejected.get_lines()) == 2
    assert "queried so far" in _legend(some_rejected)


def test_running_accuracy_shows_the_same_run_baselines_and_merges_coinciding_ones():
    preds = make_predictions(n=96, seed=0)
    rng = np.random.default_rng(1)
    zs = (rng.random(preds.height) < 0.3).astype(float)
    forward = np.where(preds["queried"].to_numpy(), 1.0, zs)
    scored = preds.with_columns(zs_score=pl.Series(zs), forward_score=pl.Series(forward))
    acc_ax = plots.running_curves_figure(scored).axes[0]
    assert _legend(acc_ax) == [
        "icd (this run)",
        "the student alone",
        "forwarding the teacher's labels",
    ]
    curves = running_curves(scored)
    last = curves.tail(1)
    assert last["running_zs_accuracy"][0] == pytest.approx(zs[~np.isnan(zs)].mean())
    # A run that is its own baseline (the student alone) draws one line, saying so.
    alone = scored.with_columns(
        mode=pl.lit("student_zero_shot"), zs_score=pl.col("score"), forward_score=pl.col("score")
    )
    acc_ax = plots.running_curves_figure(alone).axes[0]
    assert _legend(acc_ax) == [
        "student_zero_shot (this run) = the student alone = forwarding the teacher's labels"
    ]
    # Predictions written before the baselines were scored: the run alone.
    assert _legend(plots.running_curves_figure(preds).axes[0]) == ["icd (this run)"]


def test_uncertainty_names_its_measure_and_draws_the_threshold():
    preds = make_predictions(n=200, seed=1)
    fixed = plots.uncertainty_figure(preds, measure="margin", threshold="fixed", tau=0.7).axes[0]
    assert "1 − (p1 − p2)" in fixed.get_xlabel()
    lines = [ln for ln in fixed.get_lines() if ln.get_linestyle() == "--"]
    assert [ln.get_xdata()[0] for ln in lines] == [0.7]
    assert "query threshold τ=0.7" in _legend(fixed)
    adaptive = plots.uncertainty_figure(
        preds, measure="entropy_mean", threshold="adaptive", budget=0.1, warmup=5
    ).axes[0]
    values = preds["zs_uncertainty"].drop_nulls().to_numpy()
    (line,) = [ln for ln in adaptive.get_lines() if ln.get_linestyle() == "--"]
    assert line.get_xdata()[0] == pytest.approx(np.quantile(values, 0.9))
    assert (values > line.get_xdata()[0]).mean() == pytest.approx(0.1, abs=0.01)
    warm = int(preds.filter(pl.col("queried") & (pl.col("stream_pos") < 5)).height)
    assert f"queried in the warm-up (first 5) (n={warm})" in _legend(adaptive)
    assert "mean token entropy" in adaptive.get_xlabel()
    assert plots.query_threshold(values, "always", None, 0.1) is None


def test_compute_points_at_the_same_compute_are_set_apart():
    table = _table(
        [("shapes", v, "icd", b, s, 0.4 + 0.01 * s, b) for v in ("icd", "rices")
         for b in (0.04, 0.08) for s in (0, 1, 2)]
    ).with_columns(pl.lit(5e9).alias("compute_flops_mean"))  # fmt: skip
    ax = plots.accuracy_vs_compute_figure(table, title="bench").axes[0]
    assert _legend(ax) == ["icd ρ=0.04", "icd ρ=0.08", "rices ρ=0.04", "rices ρ=0.08"]
    xs = [ln.get_xdata()[0] for ln in ax.get_lines() if ln.get_marker() not in ("_", "None")]
    assert len(set(np.round(xs, 3))) == 4  # four points, four places
    assert "mean ± std over 3 stream orders" in ax.get_title()


def test_running_comparison_averages_stream_orders_and_marks_coinciding_lines():
    runs = [make_predictions(run_id=f"icd-{s}", n=64, seed=s) for s in range(3)]
    twin = runs[0].with_columns(pl.lit("twin").alias("run_id"))
    preds = pl.concat([*runs, twin])
    labels = {f"icd-{s}": "icd" for s in range(3)} | {"twin": "rices"}
    ax = plots.running_comparison_figure(preds, labels=labels, variants={"icd": "icd"}).axes[0]
    assert _legend(ax) == ["icd", "rices"]
    icd_line = ax.get_lines()[0]
    finals = [r.filter(pl.col("score").is_not_null())["score"].mean() * 100 for r in runs]
    assert icd_line.get_ydata()[-1] == pytest.approx(np.mean(finals))
    assert icd_line.get_color() == plots.style("icd")["color"]
    assert "mean ± std over 3 stream orders (bands)" in ax.get_title()
    same = plots.running_comparison_figure(
        pl.concat([runs[0], twin]), labels={"icd-0": "icd", "twin": "rices"}
    ).axes[0]
    assert _legend(same) == ["icd", "rices (= icd)"]


def _overlaps(fig, ax) -> bool:  # noqa: ANN001
    """Whether ``ax``'s legend lies over its plotting area (after drawing ``fig``)."""
    fig.canvas.draw()  # type: ignore[attr-defined]
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    legend = ax.get_legend().get_window_extent(renderer)
    return bool(legend.overlaps(ax.get_window_extent(renderer)))


def test_legends_stay_off_the_data():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    preds = make_predictions(n=96, seed=0)
    fig = plots.running_curves_figure(preds, title="r", budget=0.1)
    FigureCanvasAgg(fig)
    assert not any(_overlaps(fig, ax) for ax in fig.axes)
    head = plots.headline_figure(preds)
    FigureCanvasAgg(head)
    (ax,) = head.axes
    assert not _overlaps(head, ax)
    assert ax.get_ylabel() == "accuracy so far (%)"  # one y axis for the run and its baselines


def test_headline_bars_fit_an_unfolded_mlflow_description(tmp_path):
    from PIL import Image

    summary = RunSummary.from_json(
        {"mode": "icd", "accuracy": 0.45, "zs_accuracy": 0.32, "forward_accuracy": 0.38}
    )
    path = plots.plot_headline_bars(summary, tmp_path / "bars.png")
    width, height = Image.open(path).size
    assert height <= 80 and width >= 600
    (ax,) = plots.headline_bars_figure(summary).axes
    assert ax.get_xlim() == (0.0, 100.0)  # one scale for all three
    assert [t.get_text() for t in ax.texts] == ["45.0%", "32.0%", "38.0%"]
