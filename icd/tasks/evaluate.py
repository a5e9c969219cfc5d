"""Stage ``evaluate``: the chunk's prediction rows (every sample, skipped ones too) and
their sums (:mod:`icd.method.accounting`). A plain call, not a task run: a task run would
cost more than its work, and a retry would fix nothing."""

from __future__ import annotations

from typing import Any

from icd.method import accounting, metrics, steps
from icd.storage import results
from icd.tasks.base import finite_or_none
from icd.tasks.context import ChunkWork, ResumeState, RunContext
from icd.tasks.runner import Runner

COUNTERS = ("samples_seen",)


def evaluate(*, ctx: RunContext, work: ChunkWork) -> dict[str, Any]:
    """Build the chunk's prediction rows, write them as the chunk's parquet file, and return
    the chunk's sums and ratios (:func:`icd.method.accounting.chunk_metrics`)."""
    method = ctx.cfg.method
    n = len(work.valid)
    icl = work.icl
    answered = dict(zip(work.icl_rows, range(len(work.icl_rows)), strict=True)) if icl else {}

    def from_icl(field: str, i: int, empty: Any = None) -> Any:
        j = answered.get(i)
        return empty if j is None or icl is None else getattr(icl, field)[j]

    icl_answers = [from_icl("answers", i) for i in range(n)]
    votes = [work.votes.get(s.sample_id) for s in work.valid]
    teacher_zs = [work.teacher_zs.get(s.sample_id) for s in work.valid]
    finals = steps.final_answers(
        ctx.plan, work.zs_answers, icl_answers=icl_answers, votes=votes, teacher_zs=teacher_zs
    )
    gated = set(work.icl_gated)
    records: list[dict[str, Any]] = []
    valid = iter(range(n))
    for s in work.chunk.samples:
        rec: dict[str, Any] = {
            "run_id": ctx.run_id,
            "mode": method.mode,
            "dataset": ctx.cfg.data.dataset,
            "sample_id": s.sample_id,
            "chunk": work.chunk.index,
            "stream_pos": s.stream_pos,
            "question": s.question,
            "answers": list(s.answers),
            "skip_reason": s.skip_reason,
            "queried": False,
            "accepted": False,
            "teacher_votes": [],
            "demo_ids": [],
            "demo_labels": [],
        }
        if s.skip_reason is None:
            i = next(valid)
            vote, v = votes[i], votes[i] or teacher_zs[i]
            final, source = finals[i]
            demo_labels = from_icl("demo_labels", i, [])
            rec.update(
                zs_answer=work.zs_answers[i],
                zs_uncertainty=finite_or_none(work.zs_unc[i]) if work.zs_unc is not None else None,
                zs_prompt_tokens=work.zs_prompt_tokens[i] if work.zs_prompt_tokens else None,
                queried=vote is not None,
                teacher_votes=list(v.votes) if v else [],
                teacher_label=v.label if v else None,
                agreement=v.agreement if v else None,
                accepted=bool(vote is not None and vote.accepted),
                teacher_error=v.error if v else None,
                demo_ids=from_icl("demo_ids", i, []),
                demo_labels=demo_labels,
                demo_accuracy=_demo_accuracy(ctx, demo_labels, s.answers),
                icl_answer=icl_answers[i],
                icl_gated=i in gated,
                icl_uncertainty=from_icl("uncertainties", i),
                icl_prompt_tokens=from_icl("prompt_tokens", i),
                student_error=(work.student_errors[i] if work.student_errors else None)
                or from_icl("errors", i),
                final_answer=final,
                final_source=source,
                score=ctx.score(final, s.answers) if s.answers else None,
            )
            rec["zs_score"], rec["forward_score"], rec["icl_score"] = accounting.baseline_scores(
                rec,
                ctx.task_type,
                synonyms=ctx.synonyms,
                class_names=ctx.class_names,
                fuzzy_threshold=method.voting.fuzzy_threshold,  # answers map as votes do
            )
        records.append(rec)
    results.write_chunk_predictions(ctx.run_dir, work.chunk.index, records)
    return accounting.chunk_metrics(
        records,
        ctx.task_type,
        synonyms=ctx.synonyms,
        class_names=ctx.class_names,
        fuzzy_threshold=method.voting.fuzzy_threshold,  # answers map onto classes as votes do
    )


def run(runner: Runner, ctx: RunContext, *, work: ChunkWork, state: ResumeState) -> None:
    """Evaluate the chunk and add it to the run's running sums."""
    chunk_m = runner.call("evaluate", evaluate, ctx=ctx, work=work)
    state.running = accounting.merge_metrics(state.running, chunk_m)
    state.counters.add("samples_seen", len(work.chunk.samples))


def _demo_accuracy(ctx: RunContext, demo_labels: list[str], answers: list[str]) -> float | None:
    """Share of a classification sample's demos that carry its true class (None otherwise)."""
    truth = answers[0] if answers else None
    if not (demo_labels and truth and ctx.task_type == "classification"):
        return None
    return metrics.demo_accuracy(demo_labels, truth, ctx.synonyms)
