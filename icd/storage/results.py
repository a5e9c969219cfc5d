"""Per-sample prediction tables (one parquet file per chunk) and the run summary.

A run's predictions live in ``RUN_DIR/predictions/chunk-NNNNN.parquet``. Each file is
written to a temporary name and renamed into place, so a killed run never leaves a half
file: a chunk's file either exists complete or not at all.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import polars as pl

PREDICTION_SCHEMA = pl.Schema(
    {
        "run_id": pl.String,
        "mode": pl.String,
        "dataset": pl.String,
        "sample_id": pl.String,
        "chunk": pl.Int64,
        "stream_pos": pl.Int64,
        "question": pl.String,
        "answers": pl.List(pl.String),
        "skip_reason": pl.String,
        "zs_answer": pl.String,
        "zs_uncertainty": pl.Float64,
        "zs_prompt_tokens": pl.Int64,
        "queried": pl.Boolean,
        "teacher_votes": pl.List(pl.String),
        "teacher_label": pl.String,
        "agreement": pl.Float64,
        "accepted": pl.Boolean,
        "teacher_error": pl.String,
        "demo_ids": pl.List(pl.String),
        "demo_labels": pl.List(pl.String),
        "demo_accuracy": pl.Float64,
        "icl_answer": pl.String,
        "icl_uncertainty": pl.Float64,
        "icl_prompt_tokens": pl.Int64,
        "student_error": pl.String,
        "final_answer": pl.String,
        "final_source": pl.String,
        "score": pl.Float64,
    }
)
# Columns that may be null ("str?" / "float?" in the contract); all others are required.
NULLABLE = frozenset(
    {
        "skip_reason",
        "zs_answer",
        "zs_uncertainty",
        "zs_prompt_tokens",
        "teacher_label",
        "agreement",
        "teacher_error",
        "demo_accuracy",
        "icl_answer",
        "icl_uncertainty",
        "icl_prompt_tokens",
        "student_error",
        "final_answer",
        "final_source",
        "score",
    }
)
FINAL_SOURCES = frozenset(
    {"teacher", "student_icl", "pool_vote", "student_zs", "teacher_zs", "student_fallback"}
)
_PREDICTIONS = "predictions"


def chunk_path(run_dir: Path, chunk_index: int) -> Path:
    """Where chunk ``chunk_index``'s predictions are stored."""
    return Path(run_dir) / _PREDICTIONS / f"chunk-{chunk_index:05d}.parquet"


def predictions_frame(records: list[dict[str, Any]]) -> pl.DataFrame:
    """Records -> a DataFrame with exactly :data:`PREDICTION_SCHEMA`.

    Raises ``ValueError`` (one line) on an unknown column, a missing required value or an
    unknown ``final_source``.
    """
    columns = set(PREDICTION_SCHEMA.names())
    for i, rec in enumerate(records):
        unknown = sorted(set(rec) - columns)
        if unknown:
            raise ValueError(f"prediction record {i}: unknown column {unknown[0]!r}")
        for name in PREDICTION_SCHEMA.names():
            if name not in NULLABLE and rec.get(name) is None:
                raise ValueError(
                    f"prediction record {i} (sample_id={rec.get('sample_id')!r}): "
                    f"missing value for {name!r}"
                )
        source = rec.get("final_source")
        if source is not None and source not in FINAL_SOURCES:
            raise ValueError(f"prediction record {i}: unknown final_source {source!r}")
    data = {name: [rec.get(name) for rec in records] for name in PREDICTION_SCHEMA.names()}
    return pl.DataFrame(data, schema=PREDICTION_SCHEMA)


def write_chunk_predictions(run_dir: Path, chunk_index: int, records: list[dict[str, Any]]) -> Path:
    """Write one chunk's prediction records to its parquet file, atomically (temporary
    file + rename); an existing file for the chunk is replaced. Returns the path."""
    path = chunk_path(run_dir, chunk_index)
    df = predictions_frame(records)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        df.write_parquet(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def completed_chunks(run_dir: Path) -> set[int]:
    """Indices of the chunks whose predictions file exists."""
    folder = Path(run_dir) / _PREDICTIONS
    if not folder.is_dir():
        return set()
    return {int(p.stem.split("-")[1]) for p in folder.glob("chunk-*.parquet")}


def read_predictions(run_dir: Path) -> pl.DataFrame:
    """All of a run's predictions, sorted by ``stream_pos`` (an empty frame with the schema
    when there are none)."""
    folder = Path(run_dir) / _PREDICTIONS
    files = sorted(folder.glob("chunk-*.parquet")) if folder.is_dir() else []
    if not files:
        return pl.DataFrame(schema=PREDICTION_SCHEMA)
    df = pl.concat([_with_all_columns(pl.read_parquet(f)) for f in files], how="vertical")
    return df.select(PREDICTION_SCHEMA.names()).sort("stream_pos")


def _with_all_columns(df: pl.DataFrame) -> pl.DataFrame:
    """A chunk file written before a nullable column existed gets it as nulls."""
    missing = [c for c in PREDICTION_SCHEMA.names() if c not in df.columns and c in NULLABLE]
    return df.with_columns(pl.lit(None, PREDICTION_SCHEMA[c]).alias(c) for c in missing)


def _mean(series: pl.Series) -> float | None:
    values = series.drop_nulls()
    values = values.filter(values.is_not_nan()) if values.dtype.is_float() else values
    return float(values.mean()) if len(values) else None


def summarize(
    df: pl.DataFrame,
    extra: dict[str, Any] | None = None,
    score_fn: Callable[[str, list[str]], float] | None = None,
    *,
    groups: Mapping[str, Sequence[str]] | None = None,
    task: str | None = None,
) -> dict[str, Any]:
    """The run summary of a predictions table.

    ``accuracy`` is the mean ``score`` over scored (non-skipped) samples, also split into
    ``accuracy_queried`` and ``accuracy_not_queried``; ``annotation_rate``
    is ``queried / (samples - skipped)``; ``mean_agreement`` averages the queried samples'
    vote agreement; ``demo_accuracy`` averages the per-sample demo accuracy where known.
    ``zs_accuracy`` comes from ``extra["zs_accuracy"]`` if given, else from ``score_fn(
    zs_answer, answers)`` over the non-skipped samples, else None. ``forward_accuracy``
    (this run's teacher labels forwarded, the student's zero-shot answers elsewhere — the
    ``teacher_forward`` baseline on the same samples) comes from ``extra``. ``teacher_calls``,
    ``pool_size`` and ``seconds`` (and run_id/mode/dataset for an empty table) come from
    ``extra``.

    The gain over the student alone splits in two: ``gain_from_teacher_labels`` =
    ``forward_accuracy - zs_accuracy`` (forwarding the teacher's labels on the queried
    samples) and ``gain_from_icl`` = ``accuracy - forward_accuracy`` (what the run adds
    beyond that: in-context learning on the samples the teacher never saw). With ``groups``
    (class groups such as ``base``/``novel``, by ground-truth class) and ``score_fn``, each
    group ``g`` gets ``samples_g``, ``accuracy_g``, ``accuracy_not_queried_g``,
    ``zs_accuracy_g``, ``forward_accuracy_g`` and its two gains. The student's costs
    (``*_prompt_tokens_*``, ``demos_per_icl_prompt``, ``seconds_per_*_prompt``) are those of
    :func:`_costs`.

    A captioning run (``task="captioning"``) also gets corpus-level ``bleu`` (BLEU-4,
    sacrebleu, 0–100), ``bleu1`` (BLEU-1) and ``cider`` (CIDEr-D, pycocoevalcap's scale) of
    the final captions against the references, over the non-skipped samples (a sample
    without a final caption counts as an empty one), and ``zs_bleu`` / ``zs_bleu1`` /
    ``zs_cider`` of the student's zero-shot captions where it gave them
    (:func:`_caption_metrics`); ``accuracy`` is then the mean sentence BLEU / 100.
    """
    extra = dict(extra or {})

    def first(col: str) -> Any:
        return extra[col] if col in extra else (df[col][0] if len(df) else None)

    valid = df.filter(pl.col("skip_reason").is_null())
    zs_accuracy = extra.get("zs_accuracy")
    if zs_accuracy is None and score_fn is not None and valid["zs_answer"].is_not_null().any():
        scored = [
            score_fn(a, ans) if a is not None else 0.0
            for a, ans in zip(valid["zs_answer"].to_list(), valid["answers"].to_list(), strict=True)
        ]
        zs_accuracy = float(sum(scored) / len(scored))
    queried = int(df["queried"].sum()) if len(df) else 0
    accuracy = _mean(valid["score"])
    summary = {
        "run_id": first("run_id"),
        "mode": first("mode"),
        "dataset": first("dataset"),
        "samples": len(df),
        "skipped": len(df) - len(valid),
        "accuracy": accuracy,
        # split: queried samples carry the teacher's label; the rest show what ICL adds
        "accuracy_queried": _mean(valid.filter(pl.col("queried"))["score"]),
        "accuracy_not_queried": _mean(valid.filter(~pl.col("queried"))["score"]),
        "zs_accuracy": zs_accuracy,
        "forward_accuracy": extra.get("forward_accuracy"),
        "annotation_rate": queried / len(valid) if len(valid) else 0.0,
        "queried": queried,
        "accepted": int(df["accepted"].sum()) if len(df) else 0,
        "teacher_calls": int(extra.get("teacher_calls", 0)),
        "teacher_errors": int(df["teacher_error"].is_not_null().sum()),
        "student_errors": int(df["student_error"].is_not_null().sum()) if len(df) else 0,
        "pool_size": int(extra.get("pool_size", 0)),
        "mean_agreement": _mean(df.filter(pl.col("queried"))["agreement"]),
        "demo_accuracy": _mean(df["demo_accuracy"]),
        "seconds": dict(extra.get("seconds", {})),
    }
    summary.update(_gains(summary))
    summary.update(_costs(valid, summary["seconds"]))
    summary.update(_compute(valid, extra))
    if groups and score_fn is not None:
        for name, classes in groups.items():
            summary.update(_group_split(valid, set(classes), name, score_fn))
    if task == "captioning":
        summary.update(_caption_metrics(valid))
    for key, value in summary.items():
        if isinstance(value, float) and math.isnan(value):
            summary[key] = None
    return summary


def _costs(valid: pl.DataFrame, seconds: Mapping[str, float]) -> dict[str, float | None]:
    """What the student's passes cost: prompt tokens per zero-shot and per ICL prompt (mean,
    and p95 for ICL, whose prompts grow with k), demos per ICL prompt, and seconds per
    prompt of each pass as this run spent them (stages reused from the task cache cost 0 s,
    and then give None)."""

    def tokens(col: str, q: float | None = None) -> float | None:
        values = valid[col].drop_nulls() if col in valid.columns else pl.Series([], dtype=pl.Int64)
        if not len(values):
            return None
        return float(values.mean() if q is None else values.quantile(q, "nearest"))

    def per_prompt(stage: str, col: str) -> float | None:
        n = int(valid[col].is_not_null().sum()) if col in valid.columns else 0
        spent = float(seconds.get(stage, 0.0))
        return spent / n if n and spent > 0 else None

    with_demos = valid.filter(pl.col("icl_answer").is_not_null())
    return {
        "zs_prompt_tokens_mean": tokens("zs_prompt_tokens"),
        "icl_prompt_tokens_mean": tokens("icl_prompt_tokens"),
        "icl_prompt_tokens_p95": tokens("icl_prompt_tokens", 0.95),
        "demos_per_icl_prompt": (
            float(with_demos["demo_ids"].list.len().mean()) if with_demos.height else None
        ),
        "seconds_per_zs_prompt": per_prompt("score", "zs_answer"),
        "seconds_per_icl_prompt": per_prompt("icl", "icl_answer"),
    }


def _compute(valid: pl.DataFrame, extra: Mapping[str, Any]) -> dict[str, float | None]:
    """Compute the run spent on the student: adapting it (``adapt`` in ``extra``: LoRA
    steps, tokens, FLOPs, peak memory; the fine-tuning modes) and answering (≈ 2 · N FLOPs
    per prompt token of every student pass, N = ``extra["student_params"]``)."""
    adapt = dict(extra.get("adapt") or {})
    params = float(extra.get("student_params") or 0)
    tokens = sum(
        float(valid[c].sum() or 0)
        for c in ("zs_prompt_tokens", "icl_prompt_tokens")
        if c in valid.columns
    )
    inference = 2.0 * params * tokens if params else None
    adapt_flops = float(adapt.get("flops", 0.0))
    return {
        "adapt_steps": int(adapt.get("steps", 0)),
        "adapt_tokens": int(adapt.get("tokens", 0)),
        "adapt_flops": adapt_flops,
        "adapt_seconds": float(dict(extra.get("seconds") or {}).get("adapt", 0.0)),
        "adapt_peak_rss_mb": adapt.get("peak_rss_mb"),
        "student_params": int(params),
        "inference_flops": inference,
        "compute_flops": adapt_flops + inference if inference is not None else None,
    }


def _gains(numbers: Mapping[str, Any], suffix: str = "") -> dict[str, float | None]:
    acc, zs, fwd = (
        numbers.get(f"{k}{suffix}") for k in ("accuracy", "zs_accuracy", "forward_accuracy")
    )
    return {
        f"gain_from_teacher_labels{suffix}": fwd - zs
        if fwd is not None and zs is not None
        else None,
        f"gain_from_icl{suffix}": acc - fwd if acc is not None and fwd is not None else None,
    }


def _group_split(
    valid: pl.DataFrame, classes: set[str], name: str, score_fn: Callable[[str, list[str]], float]
) -> dict[str, Any]:
    """One class group's share of the summary (rows whose first true answer is in it)."""
    rows = valid.filter(pl.col("answers").list.first().is_in(list(classes)))
    zs, fwd = [], []
    for r in rows.select("zs_answer", "teacher_label", "queried", "answers").iter_rows(named=True):
        if r["zs_answer"] is None:  # the student did not answer (teacher zero-shot mode)
            continue
        z = score_fn(r["zs_answer"], r["answers"])
        label = r["teacher_label"] if r["queried"] else None
        zs.append(z)
        fwd.append(z if label is None else score_fn(label, r["answers"]))
    out: dict[str, Any] = {
        f"samples_{name}": rows.height,
        f"accuracy_{name}": _mean(rows["score"]),
        f"accuracy_not_queried_{name}": _mean(rows.filter(~pl.col("queried"))["score"]),
        f"zs_accuracy_{name}": sum(zs) / len(zs) if zs else None,
        f"forward_accuracy_{name}": sum(fwd) / len(fwd) if fwd else None,
    }
    out.update(_gains(out, suffix=f"_{name}"))
    return out


def _caption_metrics(valid: pl.DataFrame) -> dict[str, float | None]:
    """Corpus BLEU and CIDEr of a captioning run's final captions (and of the student's
    zero-shot ones, over the samples it answered); None where there is nothing to score."""
    from icd.method.metrics import corpus_bleu, corpus_cider

    out: dict[str, float | None] = {}
    zs = valid.filter(pl.col("zs_answer").is_not_null())
    for prefix, rows, column in (("", valid, "final_answer"), ("zs_", zs, "zs_answer")):
        preds, refs = rows[column].to_list(), rows["answers"].to_list()
        some = rows.height > 0
        out[f"{prefix}bleu"] = corpus_bleu(preds, refs) if some else None
        out[f"{prefix}bleu1"] = corpus_bleu(preds, refs, max_order=1) if some else None
        out[f"{prefix}cider"] = corpus_cider(preds, refs) if some else None
    return out
