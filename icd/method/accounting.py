"""Every run-level number of ICD, defined once (docs/design.md §2.9).

The summary, the metrics logged to MLflow (per chunk and final), the run report, the
benchmark tables and the README all read the numbers made here; nothing else computes a
rate, a count or a gain of a run.

- **Sums** (:func:`chunk_metrics`): per chunk, from its prediction rows — counts and score
  sums that add up across chunks exactly (:func:`merge_metrics`), so a run's numbers do not
  depend on how its stream was cut into chunks.
- **Ratios** (:data:`RATIOS`): each is ``numerator / denominator`` of two sums, named once
  here (None while the denominator is 0). ``annotation_rate`` divides by every stream
  sample seen, skipped ones included (the budget's denominator: ``budget × stream
  length``).
- **Counters**: what the stages count as they run (teacher answers used and reused, the
  student's processed-image cache; each stage of :mod:`icd.tasks` declares its own); each
  appears under its own name.
  Teacher answers *made* by the run (``teacher_calls``, ``teacher_requests``) are those in
  its ledger: every round it paid for, across resumes.
- **Gains** (:func:`gains`): ``gain_from_teacher_labels`` = forward − zero-shot accuracy,
  ``gain_from_icl`` = accuracy − forward accuracy, on the same samples.
- **Costs** (:func:`summarize`): prompt tokens, seconds per prompt, FLOPs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from icd.method.metrics import caption_tokenizer, coco_caption_metrics, score

# Where a sample's final answer came from (icd.method.steps.final_answers).
SOURCES = ("teacher", "student_icl", "pool_vote", "student_zs", "teacher_zs", "student_fallback")

# Sums of a chunk's rows that add up across chunks.
ADDITIVE: tuple[str, ...] = (
    "samples",  # stream samples, skipped ones included
    "skipped",
    "scored",  # samples with a score (valid, with ground truth)
    "score_sum",
    "zs_scored",  # samples the student answered zero-shot
    "zs_score_sum",
    "forward_score_sum",  # the teacher's labels where queried, else the zero-shot answer
    "icl_scored",  # samples answered from demonstrations
    "icl_score_sum",
    "icl_prompts_saved",  # samples the ICL gate left with their zero-shot answer
    "queried",
    "accepted",
    "teacher_errors",
    "agreement_n",
    "agreement_sum",
    "demo_n",
    "demo_sum",
    *(f"source_{s}" for s in SOURCES),
)

# name -> (numerator, denominator), both sums above.
RATIOS: dict[str, tuple[str, str]] = {
    "accuracy": ("score_sum", "scored"),
    "zs_accuracy": ("zs_score_sum", "zs_scored"),
    "forward_accuracy": ("forward_score_sum", "zs_scored"),
    "icl_accuracy": ("icl_score_sum", "icl_scored"),
    "annotation_rate": ("queried", "samples"),
    "acceptance_rate": ("accepted", "queried"),
    "mean_agreement": ("agreement_sum", "agreement_n"),
    "demo_accuracy": ("demo_sum", "demo_n"),
}


def ratio(num: float, den: float) -> float | None:
    """``num / den``, or None when ``den`` is 0."""
    return num / den if den else None


def ratios(sums: Mapping[str, Any]) -> dict[str, float | None]:
    """Every :data:`RATIOS` entry of ``sums``."""
    return {name: ratio(sums[n], sums[d]) for name, (n, d) in RATIOS.items()}


def baseline_scores(
    row: Mapping[str, Any],
    task: str | None,
    *,
    synonyms: Mapping[str, Sequence[str]] | None = None,
    class_names: Sequence[str] | None = None,
    fuzzy_threshold: float = 0.85,
) -> tuple[float | None, float | None, float | None]:
    """The scores a valid prediction row's same-run baselines get: its zero-shot answer (the
    student alone), the forwarded answer (the teacher's label where queried, else the
    zero-shot answer) and its ICL answer — each None where the row has no such answer or
    ``task`` is None. Scored with :func:`icd.method.metrics.score`, mapped onto
    ``class_names`` as teacher votes are."""
    if task is None:
        return None, None, None
    answers = row.get("answers") or []

    def scored(answer: str) -> float:
        return score(answer, answers, task, synonyms, class_names, fuzzy_threshold)

    zs = forward = icl = None
    if row.get("zs_answer") is not None:
        zs = scored(row["zs_answer"])
        label = row.get("teacher_label") if row.get("queried") else None
        forward = zs if label is None else scored(label)
    if row.get("icl_answer") is not None:
        icl = scored(row["icl_answer"])
    return zs, forward, icl


def chunk_metrics(
    rows: Sequence[Mapping[str, Any]],
    task: str | None,
    *,
    synonyms: Mapping[str, Sequence[str]] | None = None,
    class_names: Sequence[str] | None = None,
    fuzzy_threshold: float = 0.85,
) -> dict[str, Any]:
    """The sums (:data:`ADDITIVE`) and ratios of one chunk's prediction rows.

    Reads per row: ``skip_reason``, ``answers``, ``score`` (None: unscored), ``zs_answer``,
    ``icl_answer``, ``teacher_label``, ``queried``, ``accepted``, ``agreement``,
    ``teacher_error``, ``demo_accuracy``, ``final_source``. The zero-shot, forwarded and
    ICL scores are the row's ``zs_score``, ``forward_score`` and ``icl_score`` when they are
    set, else :func:`baseline_scores` for ``task`` (None: not scored).
    """
    m: dict[str, Any] = dict.fromkeys(ADDITIVE, 0)
    m["agreement_min"] = None
    for r in rows:
        m["samples"] += 1
        if r.get("skip_reason"):
            m["skipped"] += 1
            continue
        if r.get("score") is not None:
            m["scored"] += 1
            m["score_sum"] += float(r["score"])
        zs, forward, icl = r.get("zs_score"), r.get("forward_score"), r.get("icl_score")
        if (zs is None and r.get("zs_answer") is not None) or (
            icl is None and r.get("icl_answer") is not None
        ):  # not scored when written (older predictions): score now
            zs, forward, icl = baseline_scores(
                r, task, synonyms=synonyms, class_names=class_names, fuzzy_threshold=fuzzy_threshold
            )
        if zs is not None:
            m["zs_scored"] += 1
            m["zs_score_sum"] += zs
            m["forward_score_sum"] += forward
        if icl is not None:
            m["icl_scored"] += 1
            m["icl_score_sum"] += icl
        m["icl_prompts_saved"] += bool(r.get("icl_gated"))
        if r.get("queried"):
            m["queried"] += 1
            m["accepted"] += bool(r.get("accepted"))
            m["teacher_errors"] += r.get("teacher_error") is not None
            if r.get("agreement") is not None:
                a = float(r["agreement"])
                m["agreement_n"] += 1
                m["agreement_sum"] += a
                m["agreement_min"] = a if m["agreement_min"] is None else min(m["agreement_min"], a)
        source = r.get("final_source")
        if source in SOURCES:
            m[f"source_{source}"] += 1
        if r.get("demo_accuracy") is not None:
            m["demo_n"] += 1
            m["demo_sum"] += float(r["demo_accuracy"])
    m.update(ratios(m))
    return m


def merge_metrics(running: Mapping[str, Any] | None, chunk: Mapping[str, Any]) -> dict[str, Any]:
    """The running sums and ratios after ``chunk``: sums add up, ``agreement_min`` is the
    minimum, ratios recomputed. ``running=None`` starts a run."""
    if running is None:
        return dict(chunk)
    # (.get: sums committed by an older version lack the sums added since)
    m: dict[str, Any] = {key: running.get(key, 0) + chunk.get(key, 0) for key in ADDITIVE}
    mins = [x for x in (running.get("agreement_min"), chunk.get("agreement_min")) if x is not None]
    m["agreement_min"] = min(mins) if mins else None
    m.update(ratios(m))
    return m


@dataclass(frozen=True)
class Made:
    """Teacher work this run generated (its ledger: every round, across resumes)."""

    answers: int = 0
    requests: int = 0


def teacher_numbers(made: Made) -> dict[str, int]:
    """``teacher_calls`` / ``teacher_requests``: the answers and requests the run made (its
    ledger). The counters ``teacher_answers_used`` / ``teacher_calls_reused`` say how many
    answers its labels used and how many of those another run made."""
    return {"teacher_calls": made.answers, "teacher_requests": made.requests}


def cache_numbers(counters: Mapping[str, int]) -> dict[str, float | None]:
    """``student_image_cache_hit_rate``: hits / (hits + misses) of the student's
    processed-image cache (None without the cache)."""
    hits = counters.get("student_image_cache_hits", 0)
    return {
        "student_image_cache_hit_rate": ratio(
            hits, hits + counters.get("student_image_cache_misses", 0)
        )
    }


def pool_precision(scores: Sequence[float]) -> float | None:
    """``pool_precision``: the mean of ``scores``, one per pool row left for selection whose
    sample's true answers are known — its label scored against them as the run scores an
    answer (for classification, the share of selectable demos whose label is the true
    class); None without rows."""
    return sum(scores) / len(scores) if scores else None


def running_numbers(
    running: Mapping[str, Any],
    *,
    counters: Mapping[str, int],
    made: Made,
    pool_size: int,
    pool_precision: float | None = None,
) -> dict[str, Any]:
    """The numbers logged after each chunk: the running sums and ratios, the counters, the
    teacher's and the cache's numbers, and the pool's size (rows left for selection) and
    label precision (:func:`pool_precision`). The two gains are running too, so each is a
    curve in MLflow, not one final point."""
    return {
        **running,
        **{k: v for k, v in gains(running).items() if v is not None},
        **counters,
        **teacher_numbers(made),
        **cache_numbers(counters),
        "pool_size": pool_size,
        "pool_precision": pool_precision,
    }


def gains(numbers: Mapping[str, Any], suffix: str = "") -> dict[str, float | None]:
    """``gain_from_teacher_labels`` (forward − zero-shot accuracy) and ``gain_from_icl``
    (accuracy − forward accuracy) of ``numbers`` (keys with ``suffix``: a class group)."""
    acc, zs, fwd = (
        numbers.get(f"{k}{suffix}") for k in ("accuracy", "zs_accuracy", "forward_accuracy")
    )
    return {
        f"gain_from_teacher_labels{suffix}": fwd - zs
        if fwd is not None and zs is not None
        else None,
        f"gain_from_icl{suffix}": acc - fwd if acc is not None and fwd is not None else None,
    }


@dataclass(frozen=True)
class RunTotals:
    """What a run knows beyond its predictions table: its identity, its counters, the
    teacher work it made, each stage's seconds (0 for results from the task cache) and
    how many chunks' results came from the cache, the student's adaptation cost and size,
    its pool's size and label precision (rows left for selection), and the most chunks it
    had in flight at once."""

    run_id: str | None = None
    mode: str | None = None
    dataset: str | None = None
    counters: Mapping[str, int] = field(default_factory=dict)
    made: Made = Made()
    seconds: Mapping[str, float] = field(default_factory=dict)
    cached: Mapping[str, int] = field(default_factory=dict)
    adapt: Mapping[str, float] = field(default_factory=dict)
    student_params: int = 0
    pool_size: int = 0
    pool_precision: float | None = None
    chunks_in_flight_peak: int = 0


def summarize(
    df: pl.DataFrame,
    totals: RunTotals | None = None,
    *,
    sums: Mapping[str, Any] | None = None,
    score_fn: Callable[[str, list[str]], float] | None = None,
    groups: Mapping[str, Sequence[str]] | None = None,
    task: str | None = None,
) -> dict[str, Any]:
    """The run summary: its predictions table ``df`` with its ``totals``.

    ``sums`` are the run's merged chunk sums (:func:`merge_metrics`); without them they are
    summed from ``df``'s rows (scoring the zero-shot and ICL answers when ``task`` is
    given). The ratios, counters, teacher numbers and gains are those defined above;
    ``accuracy_queried`` / ``accuracy_not_queried`` split ``accuracy`` by whether the
    teacher labelled the sample. With ``groups`` (class groups such as ``base`` /
    ``novel``, by ground-truth class) and ``score_fn``, each group ``g`` gets
    ``samples_g``, ``accuracy_g``, ``accuracy_not_queried_g``, ``zs_accuracy_g``,
    ``forward_accuracy_g`` and its two gains. Costs: :func:`_costs` and :func:`_compute`.
    A captioning run (``task="captioning"``) adds the COCO caption evaluation's ``bleu1`` …
    ``bleu4`` (``bleu`` = BLEU-4) and ``cider`` of the final captions, ``zs_*`` of the
    zero-shot ones, and the ``caption_tokenizer`` that made them (:func:`_caption_metrics`).
    """
    totals = totals or RunTotals()
    if sums is None:
        sums = chunk_metrics(df.to_dicts(), task)
    valid = df.filter(pl.col("skip_reason").is_null())
    seconds = dict(totals.seconds)
    summary: dict[str, Any] = {
        "run_id": totals.run_id if totals.run_id is not None else _first(df, "run_id"),
        "mode": totals.mode if totals.mode is not None else _first(df, "mode"),
        "dataset": totals.dataset if totals.dataset is not None else _first(df, "dataset"),
        **{
            k: sums.get(k, 0)
            for k in (
                "samples",
                "skipped",
                "queried",
                "accepted",
                "teacher_errors",
                "icl_prompts_saved",
            )
        },  # fmt: skip
        **ratios(sums),
        "accuracy_queried": _mean(valid.filter(pl.col("queried"))["score"]),
        "accuracy_not_queried": _mean(valid.filter(~pl.col("queried"))["score"]),
        "student_errors": int(df["student_error"].is_not_null().sum()) if len(df) else 0,
        "pool_size": totals.pool_size,
        "pool_precision": totals.pool_precision,
        "seconds": seconds,
        "cached_chunks": dict(totals.cached),
        "chunks_in_flight_peak": totals.chunks_in_flight_peak,
        **dict(totals.counters),
        **teacher_numbers(totals.made),
        **cache_numbers(totals.counters),
    }
    summary.update(gains(summary))
    summary.update(_costs(valid, seconds))
    summary.update(_compute(valid, totals))
    if groups and score_fn is not None:
        for name, classes in groups.items():
            summary.update(_group_split(valid, set(classes), name, score_fn))
    if task == "captioning":
        summary.update(_caption_metrics(valid))
    for key, value in summary.items():
        if isinstance(value, float) and math.isnan(value):
            summary[key] = None
    return summary


def _first(df: pl.DataFrame, col: str) -> Any:
    return df[col][0] if len(df) else None


def _mean(series: pl.Series) -> float | None:
    values = series.drop_nulls()
    values = values.filter(values.is_not_nan()) if values.dtype.is_float() else values
    return float(values.mean()) if len(values) else None  # type: ignore[arg-type]


def _costs(valid: pl.DataFrame, seconds: Mapping[str, float]) -> dict[str, float | None]:
    """What the student's passes cost: prompt tokens per zero-shot and per ICL prompt (mean,
    and p95 for ICL, whose prompts grow with k), demos per ICL prompt, and seconds per
    prompt of each pass as this run spent them (None when the run computed none of that
    stage's results: they all came from the task cache)."""

    def tokens(col: str, q: float | None = None) -> float | None:
        values = valid[col].drop_nulls() if col in valid.columns else pl.Series([], dtype=pl.Int64)
        if not len(values):
            return None
        return float(values.mean() if q is None else values.quantile(q, "nearest"))  # type: ignore[arg-type]

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
            float(with_demos["demo_ids"].list.len().mean()) if with_demos.height else None  # type: ignore[arg-type]
        ),
        "seconds_per_zs_prompt": per_prompt("score", "zs_answer"),
        "seconds_per_icl_prompt": per_prompt("icl", "icl_answer"),
    }


def _compute(valid: pl.DataFrame, totals: RunTotals) -> dict[str, float | None]:
    """Compute the run spent on the student: adapting it (LoRA steps, tokens, FLOPs, peak
    memory; the fine-tuning modes) and answering (≈ 2 · N FLOPs per prompt token of every
    student pass, N = ``student_params``)."""
    adapt = dict(totals.adapt)
    params = float(totals.student_params or 0)
    tokens = sum(
        float(valid[c].sum() or 0)
        for c in ("zs_prompt_tokens", "icl_prompt_tokens")
        if c in valid.columns
    )
    inference = 2.0 * params * tokens if params else None
    out_tokens = int(tokens)
    adapt_flops = float(adapt.get("flops", 0.0))
    return {
        "adapt_steps": int(adapt.get("steps", 0)),
        "adapt_tokens": int(adapt.get("tokens", 0)),
        "adapt_flops": adapt_flops,
        "adapt_seconds": float(totals.seconds.get("adapt", 0.0)),
        "adapt_peak_rss_mb": adapt.get("peak_rss_mb"),
        "student_params": int(params),
        "student_prompt_tokens": out_tokens,  # of every student pass, zero-shot and ICL
        "inference_flops": inference,
        "compute_flops": adapt_flops + inference if inference is not None else None,
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
    out.update(gains(out, suffix=f"_{name}"))
    return out


def _caption_metrics(valid: pl.DataFrame) -> dict[str, Any]:
    """The COCO caption evaluation (:func:`icd.method.metrics.coco_caption_metrics`) of a
    captioning run's final captions and of the student's zero-shot ones (``zs_*``, over the
    samples it answered): ``bleu1`` … ``bleu4`` (×100; ``bleu`` is BLEU-4), ``cider``
    (CIDEr-D); None where there is nothing to score. ``caption_tokenizer`` names the PTB
    tokenizer that made them (``ptb-java`` or ``ptb-python``)."""
    out: dict[str, Any] = {}
    zs = valid.filter(pl.col("zs_answer").is_not_null())
    tokenizer = caption_tokenizer()
    for prefix, rows, column in (("", valid, "final_answer"), ("zs_", zs, "zs_answer")):
        preds, refs = rows[column].to_list(), rows["answers"].to_list()
        m = coco_caption_metrics(preds, refs, tokenizer) if rows.height else {}
        out[f"{prefix}bleu"] = m.get("bleu4")
        for key in ("bleu1", "bleu2", "bleu3", "bleu4", "cider"):
            out[f"{prefix}{key}"] = m.get(key)
    out["caption_tokenizer"] = tokenizer
    return out
