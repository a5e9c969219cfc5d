"""Reports of finished runs and benchmarks: plots, a self-contained HTML page, terminal tables.

Layout read here (written by the ``stream`` and ``benchmark`` flows)::

    ROOT/runs/RUN_ID/            summary.json, config.json, predictions/chunk-*.parquet
    ROOT/benchmarks/BENCH_ID/    benchmark.json, runs.parquet, comparison.parquet, comparison.md

Reports are written into a ``report/`` folder inside the run or benchmark folder.
"""

from __future__ import annotations

import json
import math
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
from icd.report.tables import comparison_rows, fmt_count, fmt_pct
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


def build_run_report(run_dir: Path) -> ReportPaths:
    """Report of one run folder: running curves, uncertainty and agreement plots, HTML."""
    run_dir = Path(run_dir)
    preds = _run_predictions(run_dir)
    summary = _run_summary(run_dir, preds)
    config = _read_json(run_dir / "config.json")
    method = config.get("method", {})
    mode = method.get("mode")
    budgeted = mode is not None and mode_spec(mode).uses_budget
    budget = method.get("policy", {}).get("budget") if budgeted else None
    voting, policy = method.get("voting", {}), method.get("policy", {})
    a_min = voting.get("a_min")
    out = run_dir / REPORT_DIR
    name = summary.run_id or run_dir.name
    paths = {
        "headline": plots.plot_headline(preds, out / "headline.png"),
        "headline_bars": plots.plot_headline_bars(summary, out / "headline_bars.png"),
        "running": plots.plot_running_curves(preds, out / "running.png", title=name, budget=budget),
        "uncertainty": plots.plot_uncertainty_hist(
            preds,
            out / "uncertainty.png",
            title=name,
            measure=method.get("uncertainty"),
            threshold=policy.get("threshold") if budgeted else None,
            tau=policy.get("tau"),
            budget=budget,
            warmup=(policy.get("warmup") or 0) if budgeted else 0,
        ),
        "agreement": plots.plot_agreement_hist(
            preds, out / "agreement.png", a_min=a_min, title=name, votes=voting.get("n")
        ),
    }
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
    html_path = out / "report.html"
    atomic_write_text(html_path, page)  # a run and `icd report` may both write it
    return ReportPaths("run", run_dir, html_path, paths, summary)


def _run_summary(run_dir: Path, preds: pl.DataFrame) -> RunSummary:
    """The run's ``summary.json``, or (a run not finished) the summary of its predictions."""
    stored = _read_json(run_dir / "summary.json")
    if stored:
        return RunSummary.from_json(stored)
    from icd.method.accounting import RunTotals, summarize_run

    return summarize_run(preds, RunTotals(run_id=run_dir.name))


def build_benchmark_report(bench_dir: Path) -> ReportPaths:
    """Report of one benchmark folder: the main curve, running accuracy per dataset, HTML.

    The per-dataset running-accuracy plot overlays every setting: the mean over its
    stream orders (seeds) with a ± std band, read from each child run's predictions.
    """
    bench_dir = Path(bench_dir)
    info = _read_json(bench_dir / BENCHMARK_FILE)
    table = pl.read_parquet(bench_dir / COMPARISON_FILE)
    runs = pl.read_parquet(bench_dir / RUNS_FILE)
    out = bench_dir / REPORT_DIR
    name = info.get("benchmark_id", bench_dir.name)
    paths: dict[str, Path] = {
        "accuracy_vs_annotation": plots.plot_accuracy_vs_annotation(
            table, out / "accuracy_vs_annotation.png", title=name
        )
    }
    sections = [
        html.section(
            "Accuracy vs annotation rate",
            html.image(
                paths["accuracy_vs_annotation"],
                "Mean ± std over stream orders; dashed: modes without a budget.",
            ),
        )
    ]
    if "compute_flops_mean" in table.columns and table["compute_flops_mean"].is_not_null().any():
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
    sweep = (info.get("suite") or {}).get("sweep")
    if sweep and info.get("sweep_points"):
        points = {k: tuple(v) for k, v in info["sweep_points"].items()}
        paths["sweep"] = plots.plot_sweep(
            table, out / "sweep.png", points=points, key=sweep["key"],
            metrics=sweep["metrics"], title=name,
        )  # fmt: skip
        sections.append(
            html.section(
                f"Sweep over {sweep['key']}",
                html.image(paths["sweep"], "Mean ± std over stream orders, per mode and budget."),
            )
        )
    for dataset in dict.fromkeys(runs.get_column("dataset").to_list()):
        settings = runs.filter(pl.col("dataset") == dataset)
        top = settings.group_by("variant").agg(pl.col("budget").max().alias("top"))
        largest = dict(zip(top.get_column("variant"), top.get_column("top"), strict=True))
        frames, labels, variants, dashed = [], {}, {}, set()
        for r in settings.iter_rows(named=True):
            run_dir = Path(r["run_dir"]) if r["run_dir"] else None
            if run_dir is None or not run_dir.is_dir():
                continue
            frames.append(
                _run_predictions(run_dir).with_columns(pl.lit(r["run_id"]).alias("run_id"))
            )
            budget = "" if r["budget"] is None else f" ρ={r['budget']:g}"
            label = f"{r['variant']}{budget}"
            labels[r["run_id"]], variants[label] = label, r["variant"]
            if r["budget"] is not None and r["budget"] != largest[r["variant"]]:
                dashed.add(label)
        preds = pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame()
        key = f"running_{_slug(dataset)}"
        paths[key] = plots.plot_running_comparison(
            preds, out / f"{key}.png", labels=labels, title=f"{name}: {dataset}",
            variants=variants, dashed=dashed,
        )  # fmt: skip
        sections.append(html.section(f"{dataset}: over the stream", html.image(paths[key])))
    header, rows = comparison_rows(table)
    child_rows = [
        (r["dataset"], r["variant"], _fmt_value("budget", r["budget"]), _fmt_value("seed", r["seed"]),
         r["run_id"], r["mlflow_run_id"] or "", _fmt_value("accuracy", r["accuracy"]),
         _fmt_value("annotation_rate", r["annotation_rate"]))
        for r in runs.iter_rows(named=True)
    ]  # fmt: skip
    page = html.page(
        f"ICD benchmark {name}",
        html.paragraph(
            f"{bench_dir} · parent MLflow run {info.get('parent_mlflow_run_id', '?')} · "
            f"started {info.get('started', '?')}",
            "meta",
        ),
        html.section("Comparison (mean ± std over stream orders)", html.table(header, rows)),
        *sections,
        html.section(
            "Runs",
            html.table(
                [
                    "dataset",
                    "mode",
                    "budget",
                    "seed",
                    "run id",
                    "MLflow run",
                    "accuracy",
                    "annotation rate",
                ],
                child_rows,
            ),
        ),
        html.section(
            "Benchmark configuration",
            html.preformatted(json.dumps(info.get("suite", {}), indent=2)),
        ),
    )
    html_path = out / "report.html"
    atomic_write_text(html_path, page)  # a run and `icd report` may both write it
    return ReportPaths("benchmark", bench_dir, html_path, paths, table)


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
