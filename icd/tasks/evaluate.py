"""Stage ``evaluate``: the chunk's prediction rows (:class:`PredictionRow`, every sample,
skipped ones too) and their sums (:class:`icd.method.accounting.ChunkSums`). A plain call,
not a task run: a task run would cost more than its work, and a retry would fix nothing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict

from icd.data.types import Chunk, Sample
from icd.method import accounting, metrics, steps
from icd.method.accounting import ChunkSums
from icd.method.types import PredictionRow
from icd.method.voting import VoteResult
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
) -> ChunkSums:
    """Build the chunk's prediction rows from its stages' results (every sample, skipped
    ones too), write them as the chunk's parquet file, and return their sums."""
    valid = chunk.valid
    icl_answers = [demos.at(i, "answers") for i in range(len(valid))]
    votes = [labels.vote(s.sample_id) for s in valid]
    teacher_zs = [labels.teacher_answers.get(s.sample_id) for s in valid]
    finals = steps.final_answers(
        ctx.plan, answers.answers, icl_answers=icl_answers, votes=votes, teacher_zs=teacher_zs
    )
    rows: list[PredictionRow] = []
    index = iter(range(len(valid)))
    for s in chunk.samples:
        if s.skip_reason is not None:
            rows.append(_skipped_row(ctx, chunk=chunk, sample=s))
            continue
        i = next(index)
        outcome = Outcome(
            vote=votes[i],
            teacher=votes[i] or teacher_zs[i],
            final=finals[i],
            icl_answer=icl_answers[i],
            icl_gated=i in demos.gated,
        )
        rows.append(
            _row(ctx, chunk=chunk, sample=s, row=i, answers=answers, demos=demos, outcome=outcome)
        )
    results.write_chunk_predictions(ctx.run_dir, chunk.index, rows)
    return ChunkSums.of_rows(rows, ctx.task_type, **_mapping(ctx))


@dataclass(frozen=True)
class Outcome:
    """What the method decided for one valid sample: its budgeted teacher label (None:
    not queried), the teacher's answer shown in the row (that label, else the teacher's
    answer on every sample), its final answer and source, and its ICL answer."""

    vote: VoteResult | None
    teacher: VoteResult | None
    final: tuple[str | None, str | None]
    icl_answer: str | None
    icl_gated: bool


def _row(
    ctx: RunContext,
    *,
    chunk: Chunk,
    sample: Sample,
    row: int,
    answers: Answers,
    demos: Demonstrated,
    outcome: Outcome,
) -> PredictionRow:
    """The prediction row of the valid ``sample`` at valid ``row``."""
    unc = answers.uncertainty
    vote, v = outcome.vote, outcome.teacher
    final, source = outcome.final
    demo_labels: list[str] = demos.at(row, "demo_labels", [])
    out = _skipped_row(ctx, chunk=chunk, sample=sample)
    out.update(
        {
            "zs_answer": answers.answers[row],
            "zs_uncertainty": finite_or_none(unc[row]) if unc is not None else None,
            "zs_prompt_tokens": answers.prompt_tokens[row],
            "queried": vote is not None,
            "teacher_votes": list(v.votes) if v else [],
            "teacher_label": v.label if v else None,
            "agreement": v.agreement if v else None,
            "accepted": bool(vote is not None and vote.accepted),
            "teacher_error": v.error if v else None,
            "demo_ids": demos.at(row, "demo_ids", []),
            "demo_labels": demo_labels,
            "demo_accuracy": _demo_accuracy(ctx, demo_labels, sample.answers),
            "icl_answer": outcome.icl_answer,
            "icl_gated": outcome.icl_gated,
            "icl_uncertainty": demos.at(row, "uncertainties"),
            "icl_prompt_tokens": demos.at(row, "prompt_tokens"),
            "student_error": answers.errors[row] or demos.at(row, "errors"),
            "final_answer": final,
            "final_source": source,
            "score": ctx.score(final, sample.answers) if sample.answers else None,
        }
    )
    # what the same run's baselines score on the sample (answers map as votes do)
    out["zs_score"], out["forward_score"], out["icl_score"] = accounting.baseline_scores(
        out, ctx.task_type, **_mapping(ctx)
    )
    return out


def _skipped_row(ctx: RunContext, *, chunk: Chunk, sample: Sample) -> PredictionRow:
    """The prediction row of a skipped ``sample``; a valid sample's row starts from it."""
    return PredictionRow(
        run_id=ctx.run_id,
        mode=ctx.cfg.method.mode,
        dataset=ctx.cfg.data.dataset,
        sample_id=sample.sample_id,
        chunk=chunk.index,
        stream_pos=sample.stream_pos,
        question=sample.question,
        answers=list(sample.answers),
        skip_reason=sample.skip_reason,
        zs_answer=None,
        zs_uncertainty=None,
        zs_prompt_tokens=None,
        queried=False,
        teacher_votes=[],
        teacher_label=None,
        agreement=None,
        accepted=False,
        teacher_error=None,
        demo_ids=[],
        demo_labels=[],
        demo_accuracy=None,
        icl_answer=None,
        icl_gated=None,
        icl_uncertainty=None,
        icl_prompt_tokens=None,
        student_error=None,
        final_answer=None,
        final_source=None,
        score=None,
        zs_score=None,
        forward_score=None,
        icl_score=None,
    )


def _mapping(ctx: RunContext) -> _Mapping:
    """How answers map onto the run's classes when they are scored (as votes do)."""
    return _Mapping(
        synonyms=ctx.synonyms,
        class_names=ctx.class_names,
        fuzzy_threshold=ctx.cfg.method.voting.fuzzy_threshold,
    )


class _Mapping(TypedDict):
    synonyms: dict[str, list[str]] | None
    class_names: list[str] | None
    fuzzy_threshold: float


def run(
    runner: Runner,
    ctx: RunContext,
    *,
    chunk: Chunk,
    answers: Answers,
    labels: Labels,
    demos: Demonstrated,
) -> ChunkSums:
    """Evaluate the chunk (timed and booked as a stage): its prediction rows' sums."""
    return runner.call(
        "evaluate", evaluate, ctx=ctx, chunk=chunk, answers=answers, labels=labels, demos=demos
    )


def _demo_accuracy(ctx: RunContext, demo_labels: list[str], answers: list[str]) -> float | None:
    """Share of a classification sample's demos that carry its true class (None otherwise)."""
    truth = answers[0] if answers else None
    if not (demo_labels and truth and ctx.task_type == "classification"):
        return None
    return metrics.demo_accuracy(demo_labels, truth, ctx.synonyms)
