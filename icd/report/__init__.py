"""Reports of finished runs and benchmarks: plots, a self-contained HTML page, terminal tables.

Layout read here (written by the ``stream`` and ``benchmark`` flows)::

    ROOT/runs/RUN_ID/            summary.json, config.json, predictions/chunk-*.parquet
    ROOT/benchmarks/BENCH_ID/    benchmark.json, runs.parquet, comparison.parquet, comparison.md

Reports are written into a ``report/`` folder inside the run or benchmark folder.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
from rich.console import Console
from rich.segment import Segments
from rich.table import Table

from icd.method.accounting import GroupNumbers, RunSummary
from icd.method.modes import mode_spec
from icd.report import html, plots
from icd.report.tables import (
    Col,
    comparison_rows,
    fmt_count,
    fmt_pct,
    mean_col,
    require_columns,
)
from icd.storage.locks import atomic_write_text

BENCHMARK_FILE = "benchmark.json"
RUNS_FILE = "runs.parquet"
COMPARISON_FILE = "comparison.parquet"
COMPARISON_MD = "comparison.md"
REPORT_DIR = "report"
LATEST = "latest"  # the report target naming the newest run


class ReportError(FileNotFoundError):
    """The report target does not name a run or benchmark under the storage root."""


@dataclass
class ReportPaths:
    """What :func:`build_report` wrote. ``plots`` maps a plot name to its PNG; ``summary``
    is what :func:`print_summary` shows: the run summary, or the benchmark's comparison
    table."""

    kind: str  # "run" | "benchmark"
    source: Path  # the run or benchmark folder
    html: Path
    plots: dict[str, Path] = field(default_factory=dict)
    summary: RunSummary | pl.DataFrame | None = None


def benchmarks_dir(root: Path) -> Path:
    return Path(root).absolute() / "benchmarks"


def runs_dir(root: Path) -> Path:
    return Path(root).absolute() / "runs"


def resolve_target(target: str, root: Path) -> tuple[str, Path]:
    """Find what ``target`` names: ``("run", folder)`` or ``("benchmark", folder)``.

    Tried in order: a folder path (a run folder has ``predictions/``, a benchmark folder
    ``benchmark.json``); a run id under ``ROOT/runs``; a benchmark id under
    ``ROOT/benchmarks``; ``latest``, the newest run under ``ROOT/runs`` (see
    :func:`icd.report.runs.latest_run`); a benchmark suite name, which picks that suite's
    latest benchmark. Raises :class:`ReportError` with a one-line message otherwise.
    """
    path = Path(target)
    if path.is_dir():
        if (path / BENCHMARK_FILE).exists():
            return "benchmark", path.absolute()
        if (path / "predictions").is_dir() or (path / "summary.json").exists():
            return "run", path.absolute()
    if (runs_dir(root) / target).is_dir():
        return "run", runs_dir(root) / target
    if (benchmarks_dir(root) / target / BENCHMARK_FILE).exists():
        return "benchmark", benchmarks_dir(root) / target
    if target == LATEST:
        from icd.report.runs import latest_run

        newest = latest_run(root)
        if newest is not None:
            return "run", newest
    latest = latest_benchmark(target, root)
    if latest is not None:
        return "benchmark", latest
    raise ReportError(
        f"no run or benchmark {target!r} under {Path(root).absolute()} "
        "(a run written elsewhere: --root STORAGE_ROOT, or the run's folder as the target)"
    )


def latest_benchmark(suite: str, root: Path) -> Path | None:
    """The most recently started benchmark folder of suite ``suite``, if any."""
    found: list[tuple[str, Path]] = []
    base = benchmarks_dir(root)
    for meta in base.glob(f"*/{BENCHMARK_FILE}") if base.is_dir() else []:
        info = json.loads(meta.read_text())
        if info.get("suite", {}).get("name") == suite:
            found.append((info.get("started", ""), meta.parent))
    return max(found)[1] if found else None


def build_report(target: str, root: Path) -> ReportPaths:
    """Write the plots and a self-contained HTML report for a finished run or benchmark.

    ``target`` is a run id, a benchmark id or suite name, or a folder (see
    :func:`resolve_target`); ``root`` is the storage root (``storage.root``).
    """
    kind, folder = resolve_target(target, Path(root))
    if kind == "run":
        return build_run_report(folder)
    return build_benchmark_report(folder)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def _run_predictions(run_dir: Path) -> pl.DataFrame:
    from icd.storage.results import read_predictions

    return read_predictions(run_dir)


@dataclass(frozen=True)
class RunPlotSettings:
    """What a run's plots show of its ``config.json``: the budget ρ and the query policy
    (for budgeted modes only), the uncertainty measure, the vote's N and ``a_min``."""

    budget: float | None = None
    measure: str | None = None
    threshold: str | None = None
    tau: float | None = None
    warmup: int = 0
    a_min: float | None = None
    votes: int | None = None

    @classmethod
    def of(cls, config: Mapping[str, Any]) -> RunPlotSettings:
        method = config.get("method", {})
        mode = method.get("mode")
        budgeted = mode is not None and mode_spec(mode).uses_budget
        voting, policy = method.get("voting", {}), method.get("policy", {})
        return cls(
            budget=policy.get("budget") if budgeted else None,
            measure=method.get("uncertainty"),
            threshold=policy.get("threshold") if budgeted else None,
            tau=policy.get("tau"),
            warmup=(policy.get("warmup") or 0) if budgeted else 0,
            a_min=voting.get("a_min"),
            votes=voting.get("n"),
        )


def build_run_report(run_dir: Path) -> ReportPaths:
    """Report of one run folder: running curves, uncertainty and agreement plots, HTML."""
    run_dir = Path(run_dir)
    preds = _run_predictions(run_dir)
    summary = _run_summary(run_dir, preds)
    config = _read_json(run_dir / "config.json")
    name = summary.run_id or run_dir.name
    paths = _run_plots(preds, summary, RunPlotSettings.of(config), run_dir / REPORT_DIR, name)
    rows = [(k, _fmt_value(k, v)) for k, v in _flat_summary(summary.to_json()).items()]
    page = html.page(
        f"ICD run {name}",
        html.paragraph(f"{run_dir}", "meta"),
        html.section(
            "Where the gain comes from", *[html.paragraph(t) for t in gain_lines(summary)]
        ),
        html.section("Summary", html.table(["field", "value"], rows)),
        html.section(
            "Over the stream",
            html.image(
                paths["running"], "Running accuracy, pool size and annotation rate per chunk."
            ),
        ),
        html.section(
            "Student uncertainty",
            html.image(
                paths["uncertainty"], "Zero-shot uncertainty of queried vs not queried samples."
            ),
        ),
        html.section(
            "Teacher agreement",
            html.image(paths["agreement"], "Agreement of the teacher's votes on queried samples."),
        ),
        html.section(
            "Configuration",
            html.preformatted(json.dumps(config, indent=2) if config else "(no config.json)"),
        ),
    )
    html_path = run_dir / REPORT_DIR / "report.html"
    atomic_write_text(html_path, page)  # a run and `icd report` may both write it
    return ReportPaths("run", run_dir, html_path, paths, summary)


def _run_plots(
    preds: pl.DataFrame, summary: RunSummary, cfg: RunPlotSettings, out: Path, name: str
) -> dict[str, Path]:
    """A run's PNGs in ``out``, by plot name."""
    return {
        "headline": plots.plot_headline(preds, out / "headline.png"),
        "headline_bars": plots.plot_headline_bars(summary, out / "headline_bars.png"),
        "running": plots.plot_running_curves(
            preds, out / "running.png", title=name, budget=cfg.budget
        ),
        "uncertainty": plots.plot_uncertainty_hist(
            preds,
            out / "uncertainty.png",
            title=name,
            measure=cfg.measure,
            threshold=cfg.threshold,
            tau=cfg.tau,
            budget=cfg.budget,
            warmup=cfg.warmup,
        ),
        "agreement": plots.plot_agreement_hist(
            preds, out / "agreement.png", a_min=cfg.a_min, title=name, votes=cfg.votes
        ),
    }


def _run_summary(run_dir: Path, preds: pl.DataFrame) -> RunSummary:
    """The run's ``summary.json``, or (a run not finished) the summary of its predictions."""
    stored = _read_json(run_dir / "summary.json")
    if stored:
        return RunSummary.from_json(stored)
    from icd.method.accounting import RunTotals, summarize_run

    return summarize_run(preds, RunTotals(run_id=run_dir.name))


@dataclass(frozen=True)
class BenchmarkInfo:
    """What a benchmark's report shows of its ``benchmark.json`` (written by the benchmark
    flow): its id, the suite (as written), its sweep (key and metrics) and each sweep
    variant's (mode variant, swept value), the parent MLflow run and the start time."""

    benchmark_id: str
    suite: Mapping[str, Any]
    sweep_key: str | None
    sweep_metrics: tuple[str, ...]
    sweep_points: Mapping[str, tuple[str, Any]]  # variant → (mode variant, value)
    parent_mlflow_run_id: str
    started: str

    @classmethod
    def read(cls, bench_dir: Path) -> BenchmarkInfo:
        info = _read_json(bench_dir / BENCHMARK_FILE)
        sweep = (info.get("suite") or {}).get("sweep") or {}
        points = (info.get("sweep_points") or {}) if sweep else {}
        return cls(
            benchmark_id=info.get("benchmark_id", bench_dir.name),
            suite=info.get("suite", {}),
            sweep_key=sweep["key"] if points else None,
            sweep_metrics=tuple(sweep["metrics"]) if points else (),
            sweep_points={k: (v[0], v[1]) for k, v in points.items()},
            parent_mlflow_run_id=info.get("parent_mlflow_run_id", "?"),
            started=info.get("started", "?"),
        )


# The runs table's columns the benchmark report reads.
_RUNS_COLUMNS = (
    Col.DATASET, Col.VARIANT, Col.BUDGET, Col.SEED, Col.RUN_ID, Col.MLFLOW_RUN_ID, Col.RUN_DIR,
    "accuracy", "annotation_rate",
)  # fmt: skip


def build_benchmark_report(bench_dir: Path) -> ReportPaths:
    """Report of one benchmark folder: the main curve, running accuracy per dataset, HTML.

    The per-dataset running-accuracy plot overlays every setting: the mean over its
    stream orders (seeds) with a ± std band, read from each child run's predictions.
    """
    bench_dir = Path(bench_dir)
    info = BenchmarkInfo.read(bench_dir)
    table = pl.read_parquet(bench_dir / COMPARISON_FILE)
    runs = pl.read_parquet(bench_dir / RUNS_FILE)
    require_columns(runs, _RUNS_COLUMNS, f"runs table {bench_dir / RUNS_FILE}")
    out = bench_dir / REPORT_DIR
    paths: dict[str, Path] = {}
    sections = _benchmark_plots(table, info, out, paths)
    for dataset in dict.fromkeys(runs.get_column(Col.DATASET).to_list()):
        key = f"running_{_slug(dataset)}"
        paths[key] = _plot_dataset_runs(
            runs.filter(pl.col(Col.DATASET) == dataset),
            out / f"{key}.png",
            title=f"{info.benchmark_id}: {dataset}",
        )
        sections.append(html.section(f"{dataset}: over the stream", html.image(paths[key])))
    header, rows = comparison_rows(table)
    page = html.page(
        f"ICD benchmark {info.benchmark_id}",
        html.paragraph(
            f"{bench_dir} · parent MLflow run {info.parent_mlflow_run_id} · started {info.started}",
            "meta",
        ),
        html.section("Comparison (mean ± std over stream orders)", html.table(header, rows)),
        *sections,
        html.section("Runs", html.table(list(_CHILD_HEADER), _child_rows(runs))),
        html.section(
            "Benchmark configuration", html.preformatted(json.dumps(info.suite, indent=2))
        ),
    )
    html_path = out / "report.html"
    atomic_write_text(html_path, page)  # a run and `icd report` may both write it
    return ReportPaths("benchmark", bench_dir, html_path, paths, table)


def _benchmark_plots(
    table: pl.DataFrame, info: BenchmarkInfo, out: Path, paths: dict[str, Path]
) -> list[str]:
    """The comparison table's plots (accuracy vs annotation, vs compute where measured, the
    sweep where the suite has one) into ``out``, recorded in ``paths``; their sections."""
    name = info.benchmark_id
    paths["accuracy_vs_annotation"] = plots.plot_accuracy_vs_annotation(
        table, out / "accuracy_vs_annotation.png", title=name
    )
    sections = [
        html.section(
            "Accuracy vs annotation rate",
            html.image(
                paths["accuracy_vs_annotation"],
                "Mean ± std over stream orders; dashed: modes without a budget.",
            ),
        )
    ]
    flops = mean_col("compute_flops")
    if flops in table.columns and table[flops].is_not_null().any():
        paths["accuracy_vs_compute"] = plots.plot_accuracy_vs_compute(
            table, out / "accuracy_vs_compute.png", title=name
        )
        sections.append(
            html.section(
                "Accuracy vs compute",
                html.image(
                    paths["accuracy_vs_compute"],
                    "Student FLOPs per run: LoRA adaptation plus every student pass "
                    "(≈ 2 · parameters per prompt token).",
                ),
            )
        )
    if info.sweep_key is not None:
        paths["sweep"] = plots.plot_sweep(
            table, out / "sweep.png", points=info.sweep_points,
            key=info.sweep_key, metrics=info.sweep_metrics, title=name,
        )  # fmt: skip
        sections.append(
            html.section(
                f"Sweep over {info.sweep_key}",
                html.image(paths["sweep"], "Mean ± std over stream orders, per mode and budget."),
            )
        )
    return sections


def _plot_dataset_runs(settings: pl.DataFrame, path: Path, *, title: str) -> Path:
    """One dataset's runs over the stream, a line per (variant, budget) — the mean of its
    stream orders —, a mode's smaller budgets dashed."""
    top = settings.group_by(Col.VARIANT).agg(pl.col(Col.BUDGET).max().alias("top"))
    largest = dict(zip(top.get_column(Col.VARIANT), top.get_column("top"), strict=True))
    frames, labels, variants, dashed = [], {}, {}, set()
    for r in settings.iter_rows(named=True):
        run_dir = Path(r[Col.RUN_DIR]) if r[Col.RUN_DIR] else None
        if run_dir is None or not run_dir.is_dir():
            continue
        run_id, variant, budget = r[Col.RUN_ID], r[Col.VARIANT], r[Col.BUDGET]
        frames.append(_run_predictions(run_dir).with_columns(pl.lit(run_id).alias("run_id")))
        label = variant + ("" if budget is None else f" ρ={budget:g}")
        labels[run_id], variants[label] = label, variant
        if budget is not None and budget != largest[variant]:
            dashed.add(label)
    preds = pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame()
    return plots.plot_running_comparison(
        preds, path, labels=labels, title=title, variants=variants, dashed=dashed
    )


_CHILD_HEADER = ("dataset", "mode", "budget", "seed", "run id", "MLflow run", "accuracy",
                 "annotation rate")  # fmt: skip


def _child_rows(runs: pl.DataFrame) -> list[tuple[str, ...]]:
    """The runs table's rows as the report's "Runs" section shows them."""
    return [
        (r[Col.DATASET], r[Col.VARIANT], _fmt_value("budget", r[Col.BUDGET]),
         _fmt_value("seed", r[Col.SEED]), r[Col.RUN_ID], r[Col.MLFLOW_RUN_ID] or "",
         _fmt_value("accuracy", r["accuracy"]),
         _fmt_value("annotation_rate", r["annotation_rate"]))
        for r in runs.iter_rows(named=True)
    ]  # fmt: skip


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)


def _flat_summary(summary: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in summary.items():
        if isinstance(v, dict):
            flat.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            flat[k] = v
    return flat


_PERCENT_FIELDS = ("accuracy", "zs_accuracy", "annotation_rate", "mean_agreement", "demo_accuracy")
_PERCENT_PREFIXES = ("accuracy_", "zs_accuracy_", "forward_accuracy")
_PERCENT_SUFFIXES = ("_rate", "_precision", "agreement", "_hit_rate")


def gain_lines(summary: RunSummary) -> list[str]:
    """The run's gain over the student alone in words: from forwarded teacher labels and
    from in-context learning, overall and per class group (base / novel) where known."""

    def pp(value: float | None) -> str:
        return "–" if value is None else f"{100 * value:+.1f} pp"

    def pct(value: float | None) -> str:
        return "–" if value is None else f"{100 * value:.1f} %"

    adapts = str(summary.mode or "").startswith("finetune_lora")
    second = "LoRA adaptation (and demos)" if adapts else "in-context learning"
    overall = GroupNumbers(
        summary.samples,
        summary.accuracy,
        summary.accuracy_not_queried,
        summary.zs_accuracy,
        summary.forward_accuracy,
        summary.gains,
    )
    groups = [("all samples", overall)]
    groups += [(f"{g} classes", summary.groups[g]) for g in sorted(summary.groups)]
    return [
        f"{label}: student zero-shot {pct(n.zs_accuracy)}, "
        f"gain from forwarded teacher labels {pp(n.gains.from_teacher_labels)}, "
        f"gain from {second} {pp(n.gains.from_icl)} "
        f"→ {pct(n.accuracy)}; not queried {pct(n.accuracy_not_queried)}"
        for label, n in groups
    ]


def fmt_value(key: str, value: Any) -> str:
    """A summary field's value with its unit: rates and accuracies in %, gains in points,
    compute in GFLOPs, stage times in s, other numbers plain."""
    return _fmt_value(key, value)


def _fmt_value(key: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    number = isinstance(value, int | float) and not isinstance(value, bool)
    leaf = key.rsplit(".", 1)[-1]
    if number and leaf.startswith("gain_from_"):
        return f"{100 * value:+.2f} pts"
    percent = (
        key in _PERCENT_FIELDS
        or key.startswith(_PERCENT_PREFIXES)
        or leaf.endswith(_PERCENT_SUFFIXES)
        or "accuracy" in leaf
    )
    if percent and number:
        return f"{100 * value:.2f} %"
    if number and leaf.endswith("_flops"):
        return f"{value / 1e9:,.2f} GFLOPs"
    if key.startswith("seconds") and isinstance(value, int | float):
        return f"{value:.2f} s"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _grouped(summary: RunSummary) -> list[tuple[str, str, Any]]:
    """The summary's fields as (group, field, value) rows in the groups MLflow shows them
    in (headline first; run identity and paths last), leaving out fields the run's mode
    does not use (no value)."""
    from icd.storage.tracking import metric_key

    rows = []
    for k, v in _flat_summary(summary.to_json()).items():
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        key = metric_key(k)
        group = key.split("/", 1)[0] if "/" in key else "run"
        rows.append((group, k, v))
    order = {"headline": 0, "run": 9}
    return sorted(rows, key=lambda r: (order.get(r[0], 1), r[0]))


def print_summary(summary: RunSummary | pl.DataFrame, console: Console | None = None) -> None:
    """Print a run summary or a comparison/runs table (polars) as a rich table."""
    console = console or Console()
    if isinstance(summary, pl.DataFrame):
        if "accuracy_mean" in summary.columns:
            header, rows = comparison_rows(summary)
        else:
            header = summary.columns
            rows = [[_fmt_value(k, v) for k, v in r.items()] for r in summary.iter_rows(named=True)]
        table = Table(
            *header, title="ICD benchmark" if "accuracy_mean" in summary.columns else None
        )
        for row in rows:
            table.add_row(*row)
    else:
        title = f"ICD run {summary.run_id}".strip()
        table = Table("group", "field", "value", title=title)
        for group, k, v in _grouped(summary):
            table.add_row(group, k, _fmt_value(k, v))
    # every cell whole, however wide that makes the table (the compact views fit 100 columns)
    natural = console.measure(table, options=console.options.update_width(10_000)).maximum
    options = console.options.update_width(max(console.width, natural))
    for line in console.render_lines(table, options, new_lines=True):
        console.print(Segments(line), soft_wrap=True, end="")


def print_headline(summary: RunSummary, console: Console | None = None) -> None:
    """The run's headline: accuracy against its same-run baselines (what applies to the
    mode), teacher use, time, and where the results are. ``print_summary`` prints it all."""
    console = console or Console()
    acc = summary.accuracy
    skipped = f" ({fmt_count(summary.skipped)} skipped)" if summary.skipped else ""
    lines = [
        f"[bold]ICD run {summary.run_id}[/] — mode {summary.mode} on "
        f"{summary.dataset}, {fmt_count(summary.samples)} samples{skipped}",
        f"  accuracy                      [bold]{fmt_pct(acc)}[/]",
    ]
    for label, base in (
        ("the student alone", summary.zs_accuracy),
        ("forwarding the teacher labels", summary.forward_accuracy),
    ):
        if base is not None and acc is not None:
            lines.append(f"  {label:<30}{fmt_pct(base)}  ({100 * (acc - base):+.1f} points)")
    if summary.queried:
        lines.append(
            f"  teacher labelled              {fmt_pct(summary.annotation_rate)} of samples "
            f"({fmt_count(summary.queried)} queried, {fmt_count(summary.accepted)} "
            f"pooled, {_answers(summary)})"
        )
    if summary.demo_accuracy is not None:
        lines.append(f"  demos of the query's class    {fmt_pct(summary.demo_accuracy)}")
    if summary.seconds:
        lines.append(f"  stage time                    {summary.stage_seconds:.1f} s")
    for line in lines:
        console.print(line, highlight=False)


def _answers(summary: RunSummary) -> str:
    """The teacher answers behind a run's labels: made by it, or reused from another run
    (the task cache)."""
    made, reused = summary.teacher_calls, summary.counter("teacher_calls_reused")
    if made and reused:
        return f"{fmt_count(made)} answers made, {fmt_count(reused)} reused"
    if reused:
        return f"{fmt_count(reused)} answers reused"
    if made:
        return f"{fmt_count(made)} answers generated"
    return "answers reused (cache)"


# The benchmark columns a terminal shows (``icd report`` and the markdown have them all).
COMPACT_COLUMNS = ("accuracy %", "not queried %", "annotation rate %", "demo accuracy %")


def print_comparison(table: pl.DataFrame, console: Console | None = None) -> None:
    """A benchmark's comparison table with the columns that fit 100 columns."""
    console = console or Console()
    header, rows = comparison_rows(table)
    keep = [i for i, h in enumerate(header) if h in ("mode", "budget ρ", "seeds", *COMPACT_COLUMNS)]
    out = Table(title="ICD benchmark (mean ± std over orders)")
    for i in keep:  # names whole; the numbers' headers wrap instead
        longest = max((len(str(row[i])) for row in rows), default=0)
        whole = header[i] in ("mode", "budget ρ")
        out.add_column(header[i], no_wrap=whole, min_width=longest if whole else None)
    for row in rows:
        out.add_row(*(row[i] for i in keep))
    console.print(out)
