"""PNG plots of runs and benchmarks (matplotlib, no display needed).

Each function takes polars frames and an output path, writes one PNG and returns its path.
Empty or degenerate inputs (no rows, one point, no queried samples, all-null columns) give
a valid figure that says what is missing instead of raising. Figures are built with the
object API (``matplotlib.figure.Figure``), so no global pyplot state or GUI backend is
touched and plotting is safe from worker threads.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypedDict, cast

import numpy as np
import polars as pl
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.layout_engine import ConstrainedLayoutEngine
from matplotlib.ticker import NullLocator

from icd.method.accounting import RunSummary
from icd.report.tables import Col, mean_col, running_curves, std_col

_DPI = 110
_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")


# One colour, marker and line style per mode, the same in every plot; other variants (an
# ablation, a sweep point) get a style from their name, stable across plots and runs.
_MODE_STYLES: dict[str, tuple[str, str, str]] = {
    "icd": ("#d62728", "o", "-"),
    "icd_oracle": ("#7f7f7f", "D", ":"),
    "teacher_forward": ("#1f77b4", "s", "-"),
    "student_zero_shot": ("#000000", "v", "--"),
    "teacher_zero_shot": ("#9467bd", "^", "--"),
    "rices": ("#2ca02c", "P", "-"),
    "random_demos": ("#ff7f0e", "X", "-"),
    "pool_vote": ("#8c564b", "*", "-"),
    "finetune_lora": ("#17becf", "h", "-"),
    "finetune_lora_icd": ("#e377c2", "p", "-"),
}
_EXTRA_COLORS = ("#bcbd22", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94",
                 "#f7b6d2", "#dbdb8d", "#9edae5", "#393b79", "#637939", "#8c6d31", "#843c39")  # fmt: skip
_EXTRA_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">")


class Style(TypedDict):
    """A line's look, as matplotlib's keyword arguments of those names."""

    color: str
    marker: str
    ls: str


def style(variant: str) -> Style:
    """Matplotlib ``color``, ``marker`` and ``ls`` of a mode or variant, fixed across plots."""
    if variant in _MODE_STYLES:
        color, marker, ls = _MODE_STYLES[variant]
    else:
        import zlib

        h = zlib.crc32(variant.encode())
        color = _EXTRA_COLORS[h % len(_EXTRA_COLORS)]
        marker = _EXTRA_MARKERS[(h // len(_EXTRA_COLORS)) % len(_EXTRA_MARKERS)]
        ls = "-."
    return {"color": color, "marker": marker, "ls": ls}


def _save(fig: Figure, path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=_DPI)
    return path


def _empty(ax: Axes, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _percent_axis(ax: Axes, *values: np.ndarray) -> None:
    """Y limits for a percentage axis: the data range padded, at least 10 points tall,
    kept within [-2, 102] (a little room so markers at 0 % or 100 % stay whole)."""
    data = np.concatenate([np.asarray(v, dtype=float).ravel() for v in values] or [np.zeros(0)])
    data = data[np.isfinite(data)]
    if data.size == 0:
        return
    pad = max(2.0, 0.08 * float(data.max() - data.min()))
    lo, hi = float(data.min()) - pad, float(data.max()) + pad
    if hi - lo < 10.0:
        mid = (lo + hi) / 2
        lo, hi = mid - 5.0, mid + 5.0
    if lo < -2.0:
        lo, hi = -2.0, hi + (-2.0 - lo)
    if hi > 102.0:
        lo, hi = max(-2.0, lo - (hi - 102.0)), 102.0
    ax.set_ylim(lo, hi)


def _floats(frame: pl.DataFrame, column: str) -> np.ndarray:
    """A column as float64 with nulls as NaN (empty array if the column is absent)."""
    if column not in frame.columns:
        return np.full(frame.height, np.nan)
    return frame.get_column(column).cast(pl.Float64).fill_null(float("nan")).to_numpy()


def _coincide(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> bool:
    """Whether two (x, y) series lie on top of each other (within 0.05 points)."""
    if a[0].shape != b[0].shape:
        return False
    return all(
        np.allclose(np.nan_to_num(u), np.nan_to_num(v), atol=0.05)
        for u, v in zip(a, b, strict=True)
    )


def _coinciding(series: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, str]:
    """For each series that lies on top of an earlier one (:func:`_coincide`), the name of
    the first such earlier series that does not itself coincide with another."""
    same_as: dict[str, str] = {}
    names = list(series)
    for i, a in enumerate(names):
        for b in names[:i]:
            if b not in same_as and _coincide(series[a], series[b]):
                same_as[a] = b
                break
    return same_as


def plot_accuracy_vs_annotation(
    table: pl.DataFrame, path: Path | str, title: str | None = None
) -> Path:
    """The paper's main curve: accuracy against annotation rate, one line per mode.

    ``table`` is a comparison table (``icd.report.tables.comparison_table``). One panel
    per dataset. Settings with a budget are drawn as points joined in budget order, with
    ± std error bars over seeds on both axes and the budget ρ written next to each point.
    Settings without a budget (modes that never consult it, e.g. the zero-shot baselines)
    are horizontal reference lines labelled with their annotation rate. The budgeted modes
    are dodged side by side (±1.2 % of the x span each) so none hides under another, ICD
    drawn on top; ``title`` (the benchmark id) goes into the figure's title.
    """
    datasets = (
        [] if table.height == 0 else list(dict.fromkeys(table.get_column(Col.DATASET).to_list()))
    )
    ncols = max(1, min(3, len(datasets)))
    nrows = max(1, -(-len(datasets) // ncols))
    fig = Figure(figsize=(7.6 * ncols, 4.4 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    if not datasets:
        _empty(axes[0], "no benchmark runs")
    for ax, dataset in zip(axes, datasets, strict=False):
        _accuracy_panel(ax, dataset, table.filter(pl.col(Col.DATASET) == dataset))
    for ax in axes[len(datasets) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(f"accuracy against the teacher's labelling (benchmark {title})", fontsize=10)
    return _save(fig, path)


_ACC_MEAN, _ACC_STD = mean_col("accuracy"), std_col("accuracy")
_RATE_MEAN, _RATE_STD = mean_col("annotation_rate"), std_col("annotation_rate")


def _accuracy_panel(ax: Axes, dataset: str, sub: pl.DataFrame) -> None:
    """One dataset's panel of :func:`plot_accuracy_vs_annotation`."""
    budgeted = sub.filter(pl.col(Col.BUDGET).is_not_null()).sort(Col.BUDGET)
    ys: list[np.ndarray] = []  # every y drawn, for the axis limits
    drawn = _budgeted_curves(ax, budgeted, ys)
    _budget_marks(ax, budgeted)
    drawn = _reference_lines(ax, sub, ys) or drawn
    if not drawn:
        _empty(ax, f"{dataset}: no accuracy values")
        return
    seeds = _max_int(sub, Col.SEEDS)
    orders = "" if not seeds else f", mean ± std over {seeds} stream order{'s' * (seeds > 1)}"
    ax.set_title(f"{dataset}: accuracy vs teacher labels{orders}", fontsize=9)
    ax.set_xlabel("annotation rate (% of stream labelled by the teacher)")
    ax.set_ylabel("accuracy (%)")
    _percent_axis(ax, *ys)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)


def _max_int(frame: pl.DataFrame, column: str) -> int | None:
    """The largest value of an integer column, None when absent or all null."""
    if column not in frame.columns:
        return None
    value = frame.get_column(column).max()
    return None if value is None else int(cast(int, value))


def _budgeted_curves(ax: Axes, budgeted: pl.DataFrame, ys: list[np.ndarray]) -> bool:
    """The budgeted modes' points, joined in budget order, dodged side by side, ICD on top;
    appends the y extents drawn to ``ys``. Whether any point was drawn."""
    names = list(dict.fromkeys(budgeted.get_column(Col.VARIANT).to_list()))
    rows_of = {v: budgeted.filter(pl.col(Col.VARIANT) == v) for v in names}
    curves = {
        v: (_floats(rows, _RATE_MEAN) * 100, _floats(rows, _ACC_MEAN) * 100)
        for v, rows in rows_of.items()
    }
    # Series that coincide (e.g. ICD and its oracle when the teacher's labels are all
    # right) are all drawn, side by side, and the legend says which they coincide with.
    same_as = _coinciding(curves)
    span = max([np.nanmax(c[0]) for c in curves.values() if np.isfinite(c[0]).any()] or [1.0])
    drawn = False
    for j, variant in enumerate(names):
        rows = rows_of[variant]
        x, y = curves[variant]
        ok = ~(np.isnan(x) | np.isnan(y))
        if not ok.any():
            continue
        xerr = np.nan_to_num(_floats(rows, _RATE_STD) * 100)[ok]
        yerr = np.nan_to_num(_floats(rows, _ACC_STD) * 100)[ok]
        ys += [y[ok] - yerr, y[ok] + yerr]
        # dodged side by side (series at one budget sit at nearly one x), ICD on top
        shift = 0.012 * span * (j - (len(names) - 1) / 2)
        label = variant + (f" (= {same_as[variant]})" if variant in same_as else "")
        ours = variant == "icd"
        ax.errorbar(
            x[ok] + shift, y[ok], xerr=xerr, yerr=yerr, capsize=3, label=label,
            markersize=7 if ours else 5, lw=2.4 if ours else 1.3, alpha=0.95,
            zorder=20 if ours else 3 + j, **style(variant),
        )  # fmt: skip
        drawn = True
    return drawn


def _budget_marks(ax: Axes, budgeted: pl.DataFrame) -> None:
    """The budget ρ of each setting, once per budget, under the axis."""
    budgets = budgeted.get_column(Col.BUDGET).unique().sort().to_list() if budgeted.height else []
    for b in budgets:
        xs = _floats(budgeted.filter(pl.col(Col.BUDGET) == b), _RATE_MEAN) * 100
        if np.isfinite(xs).any():
            ax.annotate(
                f"ρ={b:g}", (float(np.nanmean(xs)), 0), xycoords=("data", "axes fraction"),
                textcoords="offset points", xytext=(0, 4), ha="center", fontsize=7,
                color="0.35",
            )  # fmt: skip


def _reference_lines(ax: Axes, sub: pl.DataFrame, ys: list[np.ndarray]) -> bool:
    """The budget-free modes as horizontal lines (± std bands), labelled with their
    annotation rate; appends the y extents drawn to ``ys``. Whether any was drawn."""
    drawn = False
    for r in sub.filter(pl.col(Col.BUDGET).is_null()).iter_rows(named=True):
        acc = r[_ACC_MEAN]
        if acc is None:
            continue
        rate = r[_RATE_MEAN]
        label = r[Col.VARIANT] + ("" if rate is None else f" (annotation {rate * 100:.0f}%)")
        st = style(r[Col.VARIANT])
        ax.axhline(acc * 100, ls="--", lw=1.2, color=st["color"], label=label)
        std = r[_ACC_STD] or 0.0
        lo, hi = (acc - std) * 100, (acc + std) * 100
        if std:
            ax.axhspan(lo, hi, color=st["color"], alpha=0.12)
        ys.append(np.array([lo, hi]))
        drawn = True
    return drawn


def _plot_merged(
    ax: Axes, x: np.ndarray, series: list[tuple[str, np.ndarray, Style]], *, marker: str | None
) -> list[np.ndarray]:
    """Plot each (label, y, style) series; series that coincide are drawn once, their
    labels joined with "=", so none hides under another. All-NaN series are left out.
    Returns the y arrays drawn."""
    groups: list[tuple[list[str], np.ndarray, Style]] = []
    for label, y, sty in series:
        if np.isnan(y).all():
            continue
        same = next((g for g in groups if _coincide((x, g[1]), (x, y))), None)
        if same is None:
            groups.append(([label], y, sty))
        else:
            same[0].append(label)
    for i, (labels, y, sty) in enumerate(groups):
        ax.plot(x, y, color=sty["color"], ls=sty["ls"], marker=marker and sty["marker"],
                lw=2.2 if i == 0 else 1.5, ms=5, label=" = ".join(labels))  # fmt: skip
    return [g[1] for g in groups]


def running_curves_figure(
    preds: pl.DataFrame, title: str | None = None, budget: float | None = None
) -> Figure:
    """The figure of :func:`plot_running_curves` (for callers that save it themselves)."""
    curves = running_curves(preds)
    fig = Figure(figsize=(9.5, 7.5), layout="constrained")  # room for the legends beside
    ax_acc, ax_pool, ax_rate = fig.subplots(3, 1, sharex=True)
    if curves.height == 0:
        for ax in (ax_acc, ax_pool, ax_rate):
            _empty(ax, "no predictions")
    else:
        x = curves.get_column("samples_seen").to_numpy()
        marker = "o" if curves.height <= 40 else None
        acc = _floats(curves, "running_accuracy") * 100
        if np.isnan(acc).all():
            _empty(ax_acc, "no scored samples")
        else:
            mode = str(preds["mode"][0]) if "mode" in preds.columns else "this run"
            series = [
                (f"{mode} (this run)", acc, style(mode)),
                ("the student alone", _floats(curves, "running_zs_accuracy") * 100,
                 style("student_zero_shot")),
                ("forwarding the teacher's labels",
                 _floats(curves, "running_forward_accuracy") * 100, style("teacher_forward")),
            ]  # fmt: skip
            shown = _plot_merged(ax_acc, x, series, marker=marker)
            ax_acc.set_ylabel("accuracy so far (%)")
            ax_acc.set_title("accuracy so far: the run and its same-run baselines", fontsize=9)
            _percent_axis(ax_acc, *shown)
            # beside the axes, never over a line
            ax_acc.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        x0 = np.concatenate([[0], x])  # counts start from an empty pool at sample 0
        pool = np.concatenate([[0], curves.get_column("pool_size").to_numpy()])
        asked = np.concatenate([[0], curves.get_column("queried").cum_sum().to_numpy()])
        if np.array_equal(pool, asked):
            # One line, said so: two identical lines would hide one another.
            ax_pool.plot(x0, pool, marker=marker, color="#1f77b4",
                         label="queried = pooled (every teacher label accepted)")  # fmt: skip
        else:
            ax_pool.plot(x0, asked, marker=marker, ls="--", color="#ff7f0e", lw=2.5, alpha=0.7,
                         label="queried so far")  # fmt: skip
            ax_pool.plot(x0, pool, marker=marker, color="#1f77b4", ms=4,
                         label="pool size (teacher labels accepted)")  # fmt: skip
        ax_pool.set_ylabel("teacher labels")
        ax_pool.set_title("teacher labels: asked for and kept in the pool", fontsize=9)
        ax_pool.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        rate = _floats(curves, "annotation_rate") * 100
        ax_rate.plot(x, rate, marker=marker, color="#2ca02c", label="annotation rate so far")
        if budget is not None:
            ax_rate.axhline(budget * 100, ls="--", color="0.3", label=f"budget ρ={budget:g}")
        ax_rate.set_ylabel("annotation rate (%)")
        ax_rate.set_title("share of the stream sent to the teacher", fontsize=9)
        _percent_axis(ax_rate, rate, np.array([budget * 100 if budget is not None else np.nan]))
        ax_rate.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        for ax in (ax_acc, ax_pool, ax_rate):
            ax.grid(alpha=0.3)
        ax_rate.set_xlabel("samples seen")
    if title:
        fig.suptitle(f"{title}: over the stream, chunk by chunk")
    return fig


def plot_running_curves(
    preds: pl.DataFrame, path: Path | str, title: str | None = None, budget: float | None = None
) -> Path:
    """One run over its stream: running accuracy, teacher labels and annotation rate.

    ``preds`` is the run's predictions table; ``title`` names the run. Three stacked panels
    sharing the x axis (samples seen): the run's accuracy so far with its same-run baselines
    (the student alone, forwarding the teacher's labels; coinciding lines drawn once with
    their labels joined); teacher labels asked
    for (queried) and kept (pool size) so far, one line when they are the same; the
    cumulative annotation rate, with the budget ρ as a dashed line when given.
    """
    return _save(running_curves_figure(preds, title=title, budget=budget), path)


def headline_figure(preds: pl.DataFrame) -> Figure:
    """The run against its same-run baselines on one y axis: the run's accuracy so far, the
    student alone and forwarding the teacher's labels, each line ending in its final value
    (the label beside it), the legend under the axes, off the data."""
    curves = running_curves(preds)
    fig = Figure(figsize=(8.0, 3.4), layout="constrained")
    ax = fig.subplots()
    acc = _floats(curves, "running_accuracy") * 100 if curves.height else np.zeros(0)
    if curves.height == 0 or np.isnan(acc).all():
        _empty(ax, "no scored samples")
        return fig
    x = curves.get_column("samples_seen").to_numpy()
    mode = str(preds["mode"][0]) if "mode" in preds.columns else "this run"
    series = [
        (f"{mode} (this run)", acc, style(mode)),
        ("the student alone", _floats(curves, "running_zs_accuracy") * 100,
         style("student_zero_shot")),
        ("forwarding the teacher's labels", _floats(curves, "running_forward_accuracy") * 100,
         style("teacher_forward")),
    ]  # fmt: skip
    marker = "o" if curves.height <= 40 else None
    shown = _plot_merged(ax, x, series, marker=marker)
    ends = []
    for name, y, st in series:
        finite = np.flatnonzero(np.isfinite(y))
        if finite.size:
            ends.append((float(y[finite[-1]]), name, st["color"]))
    # final values beside the lines' ends, nudged apart so no label covers another
    ends.sort()
    placed: list[float] = []
    for value, _name, color in ends:
        at = max(value, placed[-1] + 3.0) if placed else value
        placed.append(at)
        ax.annotate(f"{value:.1f}%", (x[-1], value), xytext=(x[-1] * 1.02, at), textcoords="data",
                    xycoords="data", ha="left", va="center", color=color, fontsize=9,
                    fontweight="bold")  # fmt: skip
    ax.set_xlim(0, float(x[-1]) * 1.13)
    ax.set_xlabel("samples seen")
    ax.set_ylabel("accuracy so far (%)")
    _percent_axis(ax, *shown, np.array(placed))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=3, frameon=False)
    ax.set_title(f"{mode} vs the student alone vs forwarding the teacher's labels", fontsize=10)
    return fig


def plot_headline(preds: pl.DataFrame, path: Path | str) -> Path:
    """:func:`headline_figure` saved as a PNG (the run page's first picture in MLflow)."""
    return _save(headline_figure(preds), path)


def headline_bars_figure(summary: RunSummary) -> Figure:
    """A strip small enough to show whole where MLflow's run page shows a description
    (under 70 px tall): the run's final accuracy and its same-run baselines' as bars on one
    0–100 % axis (gridlines every 10 points), each labelled with its value."""
    mode = str(summary.mode or "this run")
    bars = [
        (f"{mode} (this run)", summary.accuracy, style(mode)["color"]),
        ("the student alone", summary.zs_accuracy, style("student_zero_shot")["color"]),
        ("forwarding teacher labels", summary.forward_accuracy, style("teacher_forward")["color"]),
    ]
    rows = [(name, 100 * float(v), color) for name, v, color in bars if v is not None]
    fig = Figure(figsize=(7.6, 0.06 + 0.2 * max(len(rows), 1)), layout="constrained")
    engine = fig.get_layout_engine()
    assert isinstance(engine, ConstrainedLayoutEngine)  # layout="constrained"
    engine.set(h_pad=0.01, w_pad=0.02)
    ax = fig.subplots()
    if not rows:
        _empty(ax, "no scored samples")
        return fig
    y = np.arange(len(rows))[::-1]
    ax.barh(y, [v for _, v, _ in rows], color=[c for _, _, c in rows], height=0.7)
    for yi, (_, value, _) in zip(y, rows, strict=True):
        ax.text(value + 1, yi, f"{value:.1f}%", va="center", ha="left", fontsize=8,
                fontweight="bold")  # fmt: skip
    ax.set_yticks(y, [name for name, _, _ in rows], fontsize=8)
    ax.set_xlim(0, 100)  # one scale, 0–100 %: the gridlines every 10 points
    ax.set_xticks(range(0, 101, 10), [])
    ax.grid(axis="x", alpha=0.4)
    ax.tick_params(length=0)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return fig


def plot_headline_bars(summary: RunSummary, path: Path | str) -> Path:
    """:func:`headline_bars_figure` saved as a PNG at 100 dpi (its pixel size is its size on
    the page)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    headline_bars_figure(summary).savefig(path, format="png", dpi=100)
    return path


class MeanCurve(NamedTuple):
    """The running accuracy (%) of a setting's stream orders: x, mean, std, orders."""

    x: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    orders: int


def running_comparison_figure(
    preds: pl.DataFrame,
    labels: Mapping[str, str] | None = None,
    title: str | None = None,
    variants: Mapping[str, str] | None = None,
    dashed: Collection[str] = (),
) -> Figure:
    """The figure of :func:`plot_running_comparison` (for callers that save it themselves)."""
    fig = Figure(figsize=(9.5, 4.8), layout="constrained")
    ax = fig.subplots()
    means = _mean_curves(preds, labels or {})
    bands = len(means) <= 4  # more bands than that only hide one another
    ys = _draw_mean_curves(ax, means, variants or {}, dashed, bands=bands)
    orders = max((m.orders for m in means.values()), default=0)
    head = "running accuracy over the stream"
    if orders > 1:
        where = "bands" if bands else "bars at the end"
        head += f", mean ± std over {orders} stream orders ({where})"
    if means:
        ax.set_xlabel("samples seen")
        ax.set_ylabel("running accuracy (%)")
        _percent_axis(ax, *ys)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    else:
        _empty(ax, "no scored predictions")
    ax.set_title(f"{title}\n{head}" if title else head, fontsize=10)
    return fig


def _mean_curves(preds: pl.DataFrame, labels: Mapping[str, str]) -> dict[str, MeanCurve]:
    """Per label (runs sharing one are stream orders of a setting), the mean running
    accuracy of its runs that have scores, cut to the shortest; labels in run order."""
    run_ids = [] if preds.height == 0 else list(dict.fromkeys(preds.get_column("run_id").to_list()))
    groups: dict[str, list[str]] = {}
    for run_id in run_ids:
        groups.setdefault(labels.get(run_id, run_id), []).append(run_id)
    means: dict[str, MeanCurve] = {}
    for label, members in groups.items():
        curves = [running_curves(preds.filter(pl.col("run_id") == r)) for r in members]
        curves = [c for c in curves if not np.isnan(_floats(c, "running_accuracy")).all()]
        if not curves:
            continue
        n = min(c.height for c in curves)  # stream orders cut the same stream alike
        x = curves[0].get_column("samples_seen").to_numpy()[:n]
        acc = np.vstack([_floats(c, "running_accuracy")[:n] * 100 for c in curves])
        std = np.nanstd(acc, axis=0, ddof=1) if len(curves) > 1 else np.zeros(n)
        means[label] = MeanCurve(x, np.nanmean(acc, axis=0), std, len(curves))
    return means


def _draw_mean_curves(
    ax: Axes,
    means: Mapping[str, MeanCurve],
    variants: Mapping[str, str],
    dashed: Collection[str],
    *,
    bands: bool,
) -> list[np.ndarray]:
    """One line per label, its ± std as a band (``bands``) or a bar at the stream's end;
    returns the y extents drawn."""
    same_as = _coinciding({label: (m.x, m.mean) for label, m in means.items()})
    ys: list[np.ndarray] = []
    last = max((float(m.x[-1]) for m in means.values()), default=0.0)
    for i, (label, (x, mean, std, _)) in enumerate(means.items()):
        variant = variants.get(label)
        st = style(variant) if variant else {"color": _COLORS[i % len(_COLORS)], "marker": "o"}
        ls = "--" if label in dashed else "-"
        shown = label + (f" (= {same_as[label]})" if label in same_as else "")
        marker = st["marker"] if len(x) <= 40 else None
        ax.plot(x, mean, color=st["color"], marker=marker, ls=ls, label=shown, ms=5,
                mfc="white" if label in dashed else st["color"], zorder=3 + i)  # fmt: skip
        lo, hi = np.clip(mean - std, 0, 100), np.clip(mean + std, 0, 100)
        if std.any() and bands:
            ax.fill_between(x, lo, hi, color=st["color"], alpha=0.12, lw=0)
        elif std.any():  # the end of the stream only, each line's bar a little apart
            at = x[-1] + (i - (len(means) - 1) / 2) * 0.006 * last
            ax.errorbar([at], [mean[-1]], yerr=[[mean[-1] - lo[-1]], [hi[-1] - mean[-1]]],
                        color=st["color"], capsize=2, lw=1, zorder=2)  # fmt: skip
        ys += [lo, hi]
    return ys


def plot_running_comparison(
    preds: pl.DataFrame,
    path: Path | str,
    labels: Mapping[str, str] | None = None,
    title: str | None = None,
    variants: Mapping[str, str] | None = None,
    dashed: Collection[str] = (),
) -> Path:
    """Running accuracy over the stream of several runs on one axis, one line per label.

    ``preds`` holds the predictions of all the runs (column ``run_id`` tells them apart);
    ``labels`` maps run ids to legend labels (default: the run id). Runs that share a label
    are stream orders of one setting: their mean is the line and ± their std a band.
    ``variants`` maps a label to its mode variant, whose fixed :func:`style` colours the
    line (default: a colour per line); labels in ``dashed`` are drawn dashed with hollow
    markers (e.g. a mode's smaller budgets). Lines that coincide are all drawn and the
    legend says which they coincide with; the legend sits outside the axes.
    """
    fig = running_comparison_figure(
        preds, labels=labels, title=title, variants=variants, dashed=dashed
    )
    return _save(fig, path)


# What each uncertainty measure (config ``method.uncertainty``) is, for axis labels.
MEASURES: dict[str, str] = {
    "entropy_mean": "mean token entropy of the answer (nats)",
    "nll_mean": "mean negative log-probability of the answer tokens",
    "entropy_first": "entropy of the first answer token (nats)",
    "margin": "1 − (p1 − p2) of the first answer token",
    "random": "random score (no model uncertainty)",
}


def query_threshold(
    values: np.ndarray, threshold: str | None, tau: float | None, budget: float | None
) -> tuple[float, str] | None:
    """Where the query threshold sits on the uncertainty axis, and what it is, or None
    (``always``/``never``, or not enough to say). ``fixed``: ``tau``. ``adaptive``: the
    policy's running quantile tracks the value with a share ρ = ``budget`` of the
    uncertainties above it, so this is that quantile of ``values`` (the run's own)."""
    if threshold == "fixed" and tau is not None:
        return float(tau), f"query threshold τ={tau:g}"
    finite = values[np.isfinite(values)]
    if threshold == "adaptive" and budget is not None and finite.size and 0 < budget < 1:
        at = float(np.quantile(finite, 1.0 - budget))
        return at, f"adaptive threshold ≈ {at:.3g} (top {budget:.0%} of this stream)"
    return None


def uncertainty_figure(
    preds: pl.DataFrame,
    title: str | None = None,
    measure: str | None = None,
    threshold: str | None = None,
    tau: float | None = None,
    budget: float | None = None,
    warmup: int = 0,
) -> Figure:
    """The figure of :func:`plot_uncertainty_hist` (for callers that save it themselves)."""
    fig = Figure(figsize=(7.5, 4.2), layout="constrained")
    ax = fig.subplots()
    rows = (
        preds.filter(pl.col("zs_uncertainty").is_not_null() & pl.col("zs_uncertainty").is_not_nan())
        if preds.height
        else preds
    )
    values = _floats(rows, "zs_uncertainty")
    if values.size == 0:
        _empty(ax, "no student uncertainties")
    else:
        queried = rows.get_column("queried").fill_null(False).to_numpy().astype(bool)
        early = _floats(rows, "stream_pos") < warmup
        edges = np.histogram_bin_edges(values, bins=min(30, max(5, int(np.sqrt(values.size)) * 2)))
        _uncertainty_hists(ax, values, queried, early, edges.tolist(), warmup)
        line = query_threshold(values, threshold, tau, budget)
        if line is not None:
            ax.axvline(line[0], ls="--", color="0.15", lw=1.2, label=line[1])
        elif threshold in ("always", "never"):
            ax.plot([], [], " ", label=f"threshold: {threshold} (no line)")
        _symlog_counts(ax, int(np.histogram(values, bins=edges)[0].max()))
        name = MEASURES.get(measure or "", measure or "uncertainty")
        ax.set_xlabel(f"student zero-shot uncertainty: {name}" if measure else name)
        ax.set_ylabel("samples (log scale above 10)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=2,
                  frameon=False)  # fmt: skip
    head = "student uncertainty of queried and not queried samples"
    ax.set_title(f"{title}\n{head}" if title else head, fontsize=10)
    return fig


def _uncertainty_hists(
    ax: Axes,
    values: np.ndarray,
    queried: np.ndarray,
    early: np.ndarray,
    edges: list[float],
    warmup: int,
) -> None:
    """The not-queried samples' histogram, and the queried ones' stacked on one another:
    above the threshold, then the unconditional warm-up."""
    n_rest = int((~queried).sum())
    if n_rest:
        ax.hist(values[~queried], bins=edges, histtype="stepfilled", alpha=0.45,
                color="#1f77b4", edgecolor="#1f77b4", lw=1.5,
                label=f"not queried (n={n_rest})")  # fmt: skip
    else:
        ax.plot([], [], color="#1f77b4", label="not queried (n=0)")
    parts = [(queried & ~early, "queried", "#d62728")]
    if (queried & early).any():
        parts.append((queried & early, f"queried in the warm-up (first {warmup})", "#ff7f0e"))
    ax.hist([values[m] for m, _, _ in parts], bins=edges, histtype="stepfilled", stacked=True,
            alpha=0.6, color=[c for *_, c in parts], edgecolor="0.2", lw=0.6,
            label=[f"{lbl} (n={int(m.sum())})" for m, lbl, _ in parts])  # fmt: skip


def _symlog_counts(ax: Axes, highest: int) -> None:
    """A count axis linear to 10 and logarithmic above, so a handful of queried samples
    stays visible; ``highest`` is the tallest bin."""
    top = max(1, highest)
    ax.set_yscale("symlog", linthresh=10, linscale=1.5)
    ticks = [t for t in (0, 2, 4, 6, 8, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000) if t <= top]
    ticks += [t * 10**k for k in range(4, 9) for t in (1, 2, 5) if t * 10**k <= top]
    ax.set_yticks(ticks, [str(t) for t in ticks])
    ax.yaxis.set_minor_locator(NullLocator())
    ax.set_ylim(0, top * 1.3)


def plot_uncertainty_hist(
    preds: pl.DataFrame,
    path: Path | str,
    title: str | None = None,
    measure: str | None = None,
    threshold: str | None = None,
    tau: float | None = None,
    budget: float | None = None,
    warmup: int = 0,
) -> Path:
    """Student zero-shot uncertainty, histogram for queried vs not queried samples.

    The x axis names the measure (``measure``, config ``method.uncertainty``). Both groups
    share the bin edges, drawn as overlapping step histograms on a count axis that is
    linear to 10 and logarithmic above, so a small queried group stays visible next to a
    large unqueried one; samples queried unconditionally in the first ``warmup`` stream
    positions are a group of their own. The query threshold (``threshold``: the policy
    kind, with ``tau`` and ``budget``; see :func:`query_threshold`) is a dashed line.
    Rows with a null uncertainty (skipped samples, modes without a student pass) are left
    out.
    """
    fig = uncertainty_figure(
        preds, title=title, measure=measure, threshold=threshold, tau=tau, budget=budget,
        warmup=warmup,
    )  # fmt: skip
    return _save(fig, path)


def plot_agreement_hist(
    preds: pl.DataFrame,
    path: Path | str,
    a_min: float | None = None,
    title: str | None = None,
    votes: int | None = None,
) -> Path:
    """Teacher vote agreement (winner votes / N) over queried samples.

    One bar per distinct agreement value (they are multiples of 1/N; ``votes`` is N when
    known, for the title), stacked by whether the annotation entered the pool (accepted)
    or was filtered out; ``a_min`` is drawn as a dashed line when given. Samples whose
    teacher call failed have no agreement and are counted in the legend only.
    """
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    queried = preds.filter(pl.col("queried").fill_null(False)) if preds.height else preds
    rows = queried.filter(pl.col("agreement").is_not_null()) if queried.height else queried
    if rows.height == 0:
        _empty(ax, "no teacher annotations" if queried.height == 0 else "no agreement values")
    else:
        agreement = _floats(rows, "agreement")
        accepted = rows.get_column("accepted").fill_null(False).to_numpy().astype(bool)
        levels = np.unique(np.round(agreement, 6))
        width = 0.8 * (np.min(np.diff(levels)) if levels.size > 1 else 0.1)
        acc_counts = np.array([np.sum((np.round(agreement, 6) == v) & accepted) for v in levels])
        rej_counts = np.array([np.sum((np.round(agreement, 6) == v) & ~accepted) for v in levels])
        ax.bar(
            levels,
            acc_counts,
            width=width,
            color="#2ca02c",
            label=f"accepted (n={acc_counts.sum()})",
        )
        ax.bar(levels, rej_counts, width=width, bottom=acc_counts, color="0.6",
               label=f"rejected (n={rej_counts.sum()})")  # fmt: skip
        failed = queried.height - rows.height
        if failed:
            ax.plot([], [], " ", label=f"no agreement (teacher error): {failed}")
        if a_min is not None:
            ax.axvline(a_min, ls="--", color="0.2", label=f"a_min={a_min:g}")
        ax.set_xlim(-0.05, 1.05)
        ax.set_ylim(0, max(1.0, float((acc_counts + rej_counts).max())) * 1.15)
        ax.set_xlabel("agreement (winner votes / N)")
        ax.set_ylabel("queried samples")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8, loc="upper left")
    head = "agreement of the teacher's votes on queried samples"
    head += f" (N={votes})" if votes else ""
    ax.set_title(f"{title}\n{head}" if title else head, fontsize=10)
    return _save(fig, path)


# Metrics that are fractions (plotted in %); the others (tokens, seconds, counts) as they are.
_RATES = (
    "accuracy", "zs_accuracy", "forward_accuracy", "gain_from", "mean_agreement",
    "demo_accuracy", "annotation_rate",
)  # fmt: skip


SweepLine = tuple[str, str, Any]  # (dataset, mode variant, budget)


def plot_sweep(
    table: pl.DataFrame,
    path: Path | str,
    *,
    points: Mapping[str, tuple[str, Any]],
    key: str,
    metrics: Sequence[str],
    title: str | None = None,
) -> Path:
    """Metrics against a swept config value: one panel per metric, one line per (dataset,
    mode variant, budget), mean ± std over stream orders. ``points`` maps each variant of
    the comparison ``table`` to its (mode variant, swept value); numeric values are placed
    on a numeric axis, others side by side in suite order."""
    values = list(dict.fromkeys(v for _, v in points.values()))
    numeric = all(isinstance(v, int | float) for v in values)
    where = {v: (float(v) if numeric else i) for i, v in enumerate(values)}
    fig = Figure(figsize=(5.2 * len(metrics), 4.0), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False).ravel()
    rows = table.filter(pl.col(Col.VARIANT).is_in(list(points))) if table.height else table
    lines: dict[SweepLine, list[dict[str, Any]]] = {}
    for r in rows.iter_rows(named=True):
        base, _ = points[r[Col.VARIANT]]
        lines.setdefault((r[Col.DATASET], base, r[Col.BUDGET]), []).append(r)
    at = {variant: where[value] for variant, (_, value) in points.items()}
    for ax, metric in zip(axes, metrics, strict=True):
        if not _sweep_lines(ax, metric, lines, at):
            _empty(ax, f"no {metric} values")
            continue
        if not numeric:
            ax.set_xticks(list(where.values()), [str(v) for v in values], rotation=20)
        ax.set_xlabel(key)
        ax.set_ylabel(metric + (" (%)" if metric.startswith(_RATES) else ""))
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _sweep_lines(
    ax: Axes,
    metric: str,
    lines: Mapping[SweepLine, list[dict[str, Any]]],
    at: Mapping[str, float],
) -> bool:
    """One panel's lines of :func:`plot_sweep` (``at``: each variant's x); whether any
    was drawn."""
    scale = 100.0 if metric.startswith(_RATES) else 1.0
    drawn = False
    for i, ((dataset, base, budget), rs) in enumerate(lines.items()):
        rs = sorted(rs, key=lambda r: at[r[Col.VARIANT]])
        x = np.array([at[r[Col.VARIANT]] for r in rs])
        means = [r.get(mean_col(metric)) for r in rs]
        y = np.array([np.nan if m is None else m for m in means]) * scale
        err = np.array([r.get(std_col(metric)) or 0.0 for r in rs]) * scale
        ok = ~np.isnan(y)
        if not ok.any():
            continue
        label = (
            base
            + ("" if budget is None else f" ρ={budget:g}")
            + (f" ({dataset})" if len({k[0] for k in lines}) > 1 else "")
        )
        st = style(base)
        if len(lines) > 1 and len({k[1] for k in lines}) < len(lines):
            st["color"] = _COLORS[i % len(_COLORS)]  # one mode at several budgets/datasets
        ax.errorbar(x[ok], y[ok], yerr=err[ok], capsize=3, label=label, **st)
        drawn = True
    return drawn


def _spread(x: np.ndarray, span: float, step: float = 0.02) -> np.ndarray:
    """Offsets (in log10 units) that set apart points whose x (log10) lie within
    ``step * span`` of each other, centred on their place, so their error bars show."""
    offsets = np.zeros_like(x)
    order = np.argsort(x, kind="stable")
    group: list[int] = []
    for i in [*order, None]:
        if i is not None and group and abs(x[i] - x[group[0]]) <= step * span:
            group.append(int(i))
            continue
        for k, j in enumerate(group):
            offsets[j] = (k - (len(group) - 1) / 2) * step * span
        group = [] if i is None else [int(i)]
    return offsets


def accuracy_vs_compute_figure(table: pl.DataFrame, title: str | None = None) -> Figure:
    """The figure of :func:`plot_accuracy_vs_compute` (for callers that save it themselves)."""
    fig = Figure(figsize=(8.4, 4.6), layout="constrained")
    ax = fig.subplots()
    rows = (
        table.filter(pl.col("compute_flops_mean").is_not_null())
        if "compute_flops_mean" in table.columns and table.height
        else table.clear()
    )
    if not rows.height:
        _empty(ax, "no compute figures (runs without a student pass)")
    else:
        budgets = sorted({b for b in rows.get_column("budget").to_list() if b is not None})
        x = np.log10(_floats(rows, "compute_flops_mean"))
        span = max(float(np.nanmax(x) - np.nanmin(x)), 0.3)
        placed = 10 ** (x + _spread(x, span))
        ys: list[np.ndarray] = []
        several_datasets = rows.get_column("dataset").n_unique() > 1
        for i, r in enumerate(rows.iter_rows(named=True)):
            y = (r["accuracy_mean"] or 0.0) * 100
            err = (r["accuracy_std"] or 0.0) * 100
            st = style(r["variant"]) | {"ls": "none"}
            # The smaller budgets hollow, the largest (and budget-free modes) filled.
            hollow = r["budget"] is not None and r["budget"] != budgets[-1]
            label = r["variant"] + ("" if r["budget"] is None else f" ρ={r['budget']:g}")
            label += f" ({r['dataset']})" if several_datasets else ""
            ax.errorbar(
                [placed[i]], [y], yerr=[err], capsize=3, markersize=7, label=label,
                mfc="white" if hollow else st["color"], mew=1.5, **st,
            )  # fmt: skip
            ys.append(np.array([y - err, y + err]))
        ax.set_xscale("log")
        ax.set_xlabel("student compute per run (FLOPs: adaptation + inference, log scale)")
        ax.set_ylabel("accuracy (%)")
        _percent_axis(ax, *ys)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    seeds = _max_int(table, Col.SEEDS)
    orders = f", mean ± std over {seeds} stream orders" if seeds and seeds > 1 else ""
    head = f"accuracy vs student compute{orders}"
    ax.set_title(f"{title}\n{head}" if title else head, fontsize=10)
    return fig


def plot_accuracy_vs_compute(
    table: pl.DataFrame, path: Path | str, title: str | None = None
) -> Path:
    """Accuracy against the compute a run spent on the student (adaptation + inference
    FLOPs, log scale): one point per (dataset, mode variant, budget), mean ± std over
    stream orders — in-context learning pays in longer prompts, fine-tuning in training.

    Each mode keeps its fixed :func:`style`; of one mode's budgets the largest is a filled
    marker and the smaller ones hollow, all named in the legend (outside the axes). Points
    at (nearly) the same compute are set side by side so each error bar shows.
    """
    return _save(accuracy_vs_compute_figure(table, title=title), path)
