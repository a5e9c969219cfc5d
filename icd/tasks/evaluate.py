"""Stage ``evaluate``: the chunk's prediction rows (every sample, skipped ones too) and
their sums (:mod:`icd.method.accounting`). A plain call, not a task run: a task run would
cost more than its work, and a retry would fix nothing."""

from __future__ import annotations

from typing import Any

from icd.data.types import Chunk
from icd.method import accounting, metrics, steps
from icd.storage import results
from icd.tasks.annotate import Labels
from icd.tasks.base import finite_or_none
from icd.tasks.context import RunContext
from icd.tasks.icl import Demonstrated
from icd.tasks.runner import Runner
from icd.tasks.zero_shot import Answers

COUNTERS = ("samples_seen",)


def evaluate(
    *, ctx: RunContext, chunk: Chunk, answers: Answers, labels: Labels, demos: Demonstrated
) -> dict[str, Any]:
    """Build the chunk's prediction rows from its stages' results, write them as the
    chunk's parquet file, and return the chunk's sums and ratios
    (:func:`icd.method.accounting.chunk_metrics`)."""
    method = ctx.cfg.method
    valid = chunk.valid
    n = len(valid)
    icl_answers = [demos.at(i, "answers") for i in range(n)]
    votes = [labels.vote(s.sample_id) for s in valid]
    teacher_zs = [labels.teacher_answers.get(s.sample_id) for s in valid]
    finals = steps.final_answers(
        ctx.plan, answers.answers, icl_answers=icl_answers, votes=votes, teacher_zs=teacher_zs
    )
    gated = set(demos.gated)
    unc = answers.uncertainty
    records: list[dict[str, Any]] = []
    rows = iter(range(n))
    for s in chunk.samples:
        rec: dict[str, Any] = {
            "run_id": ctx.run_id,
            "mode": method.mode,
            "dataset": ctx.cfg.data.dataset,
            "sample_id": s.sample_id,
            "chunk": chunk.index,
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
            i = next(rows)
            vote, v = votes[i], votes[i] or teacher_zs[i]
            final, source = finals[i]
            demo_labels = demos.at(i, "demo_labels", [])
            rec.update(
                zs_answer=answers.answers[i],
                zs_uncertainty=finite_or_none(unc[i]) if unc is not None else None,
                zs_prompt_tokens=answers.prompt_tokens[i],
                queried=vote is not None,
                teacher_votes=list(v.votes) if v else [],
                teacher_label=v.label if v else None,
                agreement=v.agreement if v else None,
                accepted=bool(vote is not None and vote.accepted),
                teacher_error=v.error if v else None,
                demo_ids=demos.at(i, "demo_ids", []),
                demo_labels=demo_labels,
                demo_accuracy=_demo_accuracy(ctx, demo_labels, s.answers),
                icl_answer=icl_answers[i],
                icl_gated=i in gated,
                icl_uncertainty=demos.at(i, "uncertainties"),
                icl_prompt_tokens=demos.at(i, "prompt_tokens"),
                student_error=answers.errors[i] or demos.at(i, "errors"),
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
    results.write_chunk_predictions(ctx.run_dir, chunk.index, records)
    return accounting.chunk_metrics(
        records,
        ctx.task_type,
        synonyms=ctx.synonyms,
        class_names=ctx.class_names,
        fuzzy_threshold=method.voting.fuzzy_threshold,  # answers map onto classes as votes do
    )


def run(
    runner: Runner,
    ctx: RunContext,
    *,
    chunk: Chunk,
    answers: Answers,
    labels: Labels,
    demos: Demonstrated,
) -> dict[str, Any]:
    """Evaluate the chunk (timed and booked as a stage): its sums and ratios."""
    return runner.call(
        "evaluate", evaluate, ctx=ctx, chunk=chunk, answers=answers, labels=labels, demos=demos
    )


def _demo_accuracy(ctx: RunContext, demo_labels: list[str], answers: list[str]) -> float | None:
    """Share of a classification sample's demos that carry its true class (None otherwise)."""
    truth = answers[0] if answers else None
    if not (demo_labels and truth and ctx.task_type == "classification"):
        return None
    return metrics.demo_accuracy(demo_labels, truth, ctx.synonyms)
