"""Tables behind the reports: running curves of one run, and the benchmark comparison.

Everything here is polars in, polars out; no plotting and no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import polars as pl

from icd.method.accounting import GroupNumbers, RunSummary


def run_metrics(s: RunSummary) -> dict[str, float | None]:
    """The run summary's numbers the runs table carries (and averages over seeds), by
    column name; ``seconds`` is the stages' seconds summed to a total."""
    novel = s.groups.get("novel", GroupNumbers(accuracy=None))
    counters = s.counters
    return {
        "accuracy": s.accuracy,
        "accuracy_not_queried": s.accuracy_not_queried,
        "zs_accuracy": s.zs_accuracy,
        "forward_accuracy": s.forward_accuracy,
        "gain_from_teacher_labels": s.gains.from_teacher_labels,
        "gain_from_icl": s.gains.from_icl,
        "accuracy_novel": novel.accuracy,
        "accuracy_not_queried_novel": novel.accuracy_not_queried,
        "annotation_rate": s.annotation_rate,
        "queried": s.queried,
        "accepted": s.accepted,
        "teacher_calls": s.teacher_calls,
        "teacher_calls_reused": counters.get("teacher_calls_reused"),
        "teacher_answers_used": counters.get("teacher_answers_used"),
        "teacher_errors": s.teacher_errors,
        "pool_size": s.pool_size,
        "pool_precision": s.pool_precision,
        "mean_agreement": s.mean_agreement,
        "demo_accuracy": s.demo_accuracy,
        "seconds": s.stage_seconds,
        "accuracy_queried": s.accuracy_queried,
        "icl_prompt_tokens_mean": s.costs.icl_prompt_tokens_mean,
        "icl_prompt_tokens_p95": s.costs.icl_prompt_tokens_p95,
        "seconds_per_zs_prompt": s.costs.seconds_per_zs_prompt,
        "seconds_per_icl_prompt": s.costs.seconds_per_icl_prompt,
        "adapt_steps": s.compute.adapt_steps,
        "adapt_seconds": s.compute.adapt_seconds,
        "adapt_flops": s.compute.adapt_flops,
        "inference_flops": s.compute.inference_flops,
        "compute_flops": s.compute.compute_flops,
        "icl_prompts": counters.get("icl_prompts"),
        "icl_prompts_saved": s.icl_prompts_saved,
        "student_prompt_tokens": s.compute.student_prompt_tokens,
    }


# The runs table's metric columns (averaged over seeds in the comparison table).
METRICS: tuple[str, ...] = tuple(run_metrics(RunSummary()))


class Col:
    """The runs and comparison tables' columns besides the metrics, named once (a metric's
    comparison columns are :func:`mean_col` and :func:`std_col`)."""

    DATASET = "dataset"
    VARIANT = "variant"
    MODE = "mode"
    BUDGET = "budget"  # null for modes that never consult the budget
    SEED = "seed"  # runs table only
    RUN_ID = "run_id"
    MLFLOW_RUN_ID = "mlflow_run_id"
    RUN_DIR = "run_dir"
    SAMPLES = "samples"  # per run; the comparison table: the mean per run
    SKIPPED = "skipped"
    ERROR = "error"
    SEEDS = "seeds"  # comparison table only: the runs aggregated


def mean_col(metric: str) -> str:
    """The comparison table's column of ``metric``'s mean over seeds."""
    return f"{metric}_mean"


def std_col(metric: str) -> str:
    """The comparison table's column of ``metric``'s sample std over seeds."""
    return f"{metric}_std"


class MissingColumnError(ValueError):
    """A table read here lacks a column its reader needs."""


def require_columns(frame: pl.DataFrame, columns: Iterable[str], table: str) -> None:
    """Raise :class:`MissingColumnError` naming what ``table`` (a description) lacks of
    ``columns``."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise MissingColumnError(
            f"the {table} has no column {', '.join(map(repr, missing))} "
            f"(it has {', '.join(frame.columns) or 'none'})"
        )


# Columns identifying one benchmark setting (one row of the comparison table).
SETTING: tuple[str, ...] = (Col.DATASET, Col.VARIANT, Col.MODE, Col.BUDGET)

RUNS_SCHEMA: dict[str, pl.DataType] = {
    Col.DATASET: pl.String(),
    Col.VARIANT: pl.String(),
    Col.MODE: pl.String(),
    Col.BUDGET: pl.Float64(),
    Col.SEED: pl.Int64(),
    Col.RUN_ID: pl.String(),
    Col.MLFLOW_RUN_ID: pl.String(),
    Col.RUN_DIR: pl.String(),
    Col.SAMPLES: pl.Int64(),
    Col.SKIPPED: pl.Int64(),
    **{m: pl.Float64() for m in METRICS},
    Col.ERROR: pl.String(),
}


# The columns of :func:`running_curves`.
CURVES_SCHEMA: dict[str, pl.DataType] = {
    "chunk": pl.Int64(),
    "samples": pl.Int64(),
    "samples_seen": pl.Int64(),
    "valid_seen": pl.Int64(),
    "chunk_accuracy": pl.Float64(),
    "running_accuracy": pl.Float64(),
    "queried": pl.Int64(),
    "accepted": pl.Int64(),
    "pool_size": pl.Int64(),
    "annotation_rate": pl.Float64(),
    "running_zs_accuracy": pl.Float64(),
    "running_forward_accuracy": pl.Float64(),
}


def running_curves(preds: pl.DataFrame) -> pl.DataFrame:
    """Per-chunk running curves of one run's predictions, ordered by chunk.

    Columns: ``chunk``; ``samples`` (rows in the chunk); ``samples_seen`` (rows up to and
    including the chunk); ``valid_seen`` (non-skipped rows so far); ``chunk_accuracy``
    (mean score in the chunk); ``running_accuracy`` (mean score of all scored rows so far);
    ``queried``/``accepted`` per chunk; ``pool_size`` (accepted annotations so far — the
    run's own pool rows); ``annotation_rate`` (queried so far / rows so far, skipped ones
    included: the denominator the budget uses); ``running_zs_accuracy`` and
    ``running_forward_accuracy``: the same run's baselines so far (the student alone, and
    forwarding the teacher's labels), over the samples the student answered zero-shot
    (null for predictions written without their ``zs_score`` / ``forward_score``).
    Accuracies are null where no row is scored yet. An empty frame gives an empty result.
    """
    if preds.height == 0:
        return pl.DataFrame(schema=CURVES_SCHEMA)
    return _running(_per_chunk(preds))


def _per_chunk(preds: pl.DataFrame) -> pl.DataFrame:
    """Per chunk, ordered by chunk: counts and score sums (zero-shot and forwarded scores
    null where the predictions lack their columns)."""
    for col in ("zs_score", "forward_score"):
        if col not in preds.columns:
            preds = preds.with_columns(pl.lit(None, dtype=pl.Float64).alias(col))
    return (
        preds.group_by("chunk")
        .agg(
            samples=pl.len().cast(pl.Int64),
            valid=pl.col("skip_reason").is_null().sum().cast(pl.Int64),
            scored=pl.col("score").is_not_null().sum().cast(pl.Int64),
            score_sum=pl.col("score").cast(pl.Float64).sum(),
            queried=pl.col("queried").fill_null(False).sum().cast(pl.Int64),
            accepted=pl.col("accepted").fill_null(False).sum().cast(pl.Int64),
            zs_scored=pl.col("zs_score").is_not_null().sum().cast(pl.Int64),
            zs_sum=pl.col("zs_score").cast(pl.Float64).sum(),
            forward_sum=pl.col("forward_score").cast(pl.Float64).sum(),
        )
        .sort("chunk")
    )


def _running(per: pl.DataFrame) -> pl.DataFrame:
    """The running curves of :func:`_per_chunk`'s sums."""
    return per.select(
        pl.col("chunk").cast(pl.Int64),
        "samples",
        samples_seen=pl.col("samples").cum_sum(),
        valid_seen=pl.col("valid").cum_sum(),
        chunk_accuracy=_ratio(pl.col("score_sum"), pl.col("scored")),
        running_accuracy=_ratio(pl.col("score_sum").cum_sum(), pl.col("scored").cum_sum()),
        queried="queried",
        accepted="accepted",
        pool_size=pl.col("accepted").cum_sum(),
        annotation_rate=_ratio(
            pl.col("queried").cum_sum().cast(pl.Float64), pl.col("samples").cum_sum()
        ),
        running_zs_accuracy=_ratio(pl.col("zs_sum").cum_sum(), pl.col("zs_scored").cum_sum()),
        running_forward_accuracy=_ratio(
            pl.col("forward_sum").cum_sum(), pl.col("zs_scored").cum_sum()
        ),
    )


def _ratio(num: pl.Expr, den: pl.Expr) -> pl.Expr:
    return pl.when(den > 0).then(num / den).otherwise(None).cast(pl.Float64)


def summary_row(
    setting: Mapping[str, object],
    summary: RunSummary | None,
    *,
    run_id: str | None = None,
    error: str | None = None,
) -> dict[str, object]:
    """One row of the runs table: the setting's coordinates plus the run summary's metrics
    (:func:`run_metrics`).

    ``setting`` holds dataset, variant, mode, budget (None for modes that never consult
    the budget) and seed. A run that failed has no ``summary`` (its metrics are then null):
    its ``run_id`` and ``error``.
    """
    keys = (*SETTING, Col.SEED)
    row: dict[str, object] = {k: setting.get(k) for k in keys}
    row[Col.RUN_ID] = summary.run_id if summary is not None else run_id
    row[Col.MLFLOW_RUN_ID] = summary.mlflow_run_id if summary is not None else None
    row[Col.RUN_DIR] = summary.run_dir if summary is not None else None
    row[Col.SAMPLES] = summary.samples if summary is not None else None
    row[Col.SKIPPED] = summary.skipped if summary is not None else None
    metrics = run_metrics(summary) if summary is not None else dict.fromkeys(METRICS)
    row.update({m: None if v is None else float(v) for m, v in metrics.items()})
    row[Col.ERROR] = error
    return row


def runs_table(rows: Iterable[Mapping[str, object]]) -> pl.DataFrame:
    """The runs table (one row per child run) with the fixed ``RUNS_SCHEMA`` columns."""
    return pl.DataFrame([dict(r) for r in rows], schema=RUNS_SCHEMA)


def comparison_table(runs: pl.DataFrame) -> pl.DataFrame:
    """Aggregate a runs table over seeds: one row per (dataset, variant, mode, budget).

    Failed runs (non-null ``error``) are left out. Columns: the setting, ``seeds`` (runs
    aggregated), ``samples`` (mean per run), and for each metric ``<m>_mean`` and
    ``<m>_std`` (sample standard deviation over seeds, null with a single seed). Rows keep
    the order in which settings first appear in ``runs``.
    """
    aggs: list[pl.Expr] = [
        pl.len().cast(pl.Int64).alias(Col.SEEDS),
        pl.col(Col.SAMPLES).cast(pl.Float64).mean().alias(Col.SAMPLES),
    ]
    for m in METRICS:
        aggs.append(pl.col(m).mean().alias(mean_col(m)))
        aggs.append(pl.col(m).std(ddof=1).alias(std_col(m)))
    if Col.ERROR in runs.columns:
        runs = runs.filter(pl.col(Col.ERROR).is_null())
    return runs.group_by(list(SETTING), maintain_order=True).agg(aggs)


# Markdown columns: (header, metric, kind) with kind "pct" (shown ×100) or "num".
_MD_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("accuracy %", "accuracy", "pct"),
    ("not queried %", "accuracy_not_queried", "pct"),
    ("novel %", "accuracy_novel", "pct"),
    ("student zero-shot %", "zs_accuracy", "pct"),
    ("gain: teacher labels pp", "gain_from_teacher_labels", "pct"),
    ("gain: ICL pp", "gain_from_icl", "pct"),
    ("annotation rate %", "annotation_rate", "pct"),
    ("teacher answers used", "teacher_answers_used", "num"),
    ("made by the run", "teacher_calls", "num"),
    ("pool size", "pool_size", "num"),
    ("pool precision %", "pool_precision", "pct"),
    ("agreement %", "mean_agreement", "pct"),
    ("demo accuracy %", "demo_accuracy", "pct"),
    ("ICL prompts saved", "icl_prompts_saved", "num"),
    ("student GFLOPs", "compute_flops", "giga"),
    ("seconds", "seconds", "num"),
)
# Columns left out of a table in which no row has a non-zero value (a feature not in use).
_ONLY_WHEN_USED = frozenset({"icl_prompts_saved"})


def fmt_pct(x: Any) -> str:
    """A rate as a percentage with one decimal ("42.0%"); "–" when missing."""
    return "–" if x is None else f"{100 * float(x):.1f}%"


def fmt_count(x: Any) -> str:
    """A count as a whole number; "–" when missing."""
    return "–" if x is None else f"{float(x):.0f}"


def mean_std(mean: float | None, std: float | None, kind: str = "num") -> str:
    """Format ``mean ± std`` ("pct" scales by 100, "giga" by 1e-9; one decimal); "–" when
    the mean is missing."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    scale, fmt = {"pct": (100.0, "{:.1f}"), "giga": (1e-9, "{:.1f}")}.get(kind, (1.0, "{:.1f}"))
    text = fmt.format(mean * scale)
    if std is not None and not math.isnan(std):
        text += " ± " + fmt.format(std * scale)
    return text


def comparison_rows(table: pl.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells of a comparison table (shared by markdown and HTML). A
    metric column no row has a value for (e.g. ``novel %`` on a dataset without class
    groups), or no non-zero one for a feature not in use (ICL prompts saved), is left out."""
    require_columns(table, _ROW_COLUMNS, "comparison table")
    columns = [(h, m, kind) for h, m, kind in _MD_COLUMNS if _shown(table, m)]
    header = ["dataset", "mode", "budget ρ", "seeds", "samples"] + [h for h, _, _ in columns]
    rows: list[list[str]] = []
    for r in table.iter_rows(named=True):
        budget, samples = r[Col.BUDGET], r[Col.SAMPLES]
        cells = [
            r[Col.DATASET],
            r[Col.VARIANT],
            "–" if budget is None else f"{budget:g}",
            str(r[Col.SEEDS]),
            "–" if samples is None else f"{samples:.0f}",
        ]
        cells += [mean_std(r[mean_col(m)], r[std_col(m)], kind) for _, m, kind in columns]
        rows.append(cells)
    return header, rows


# The comparison table's columns every row of :func:`comparison_rows` shows.
_ROW_COLUMNS = (Col.DATASET, Col.VARIANT, Col.BUDGET, Col.SEEDS, Col.SAMPLES)


def _shown(table: pl.DataFrame, metric: str) -> bool:
    """Whether the comparison table shows ``metric``: some row has a value (a non-zero one
    for a feature that may be off)."""
    col = mean_col(metric)
    if col not in table.columns:
        return False
    if metric in _ONLY_WHEN_USED:
        return bool((table[col].fill_null(0) != 0).any())
    return bool(table[col].is_not_null().any())


def to_markdown(table: pl.DataFrame) -> str:
    """A GitHub-markdown rendering of a comparison table, values as ``mean ± std``."""
    header, rows = comparison_rows(table)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines) + "\n"
