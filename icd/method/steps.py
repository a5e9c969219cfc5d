"""Chunk-level steps of ICD as pure functions; the pipeline's tasks wire them and do the I/O.

Per chunk (docs/design.md §4): :func:`student_outputs` (zero-shot answers → uncertainty) →
:func:`select_queries` (policy) → the teacher annotates → :func:`vote_annotations` →
:func:`pool_mask` (which annotations enter the pool) → :func:`choose_demos` against the pool's
vectors → the student answers with demos (:func:`icl_mask` says for which samples) →
:func:`final_answers`. What a run's mode runs is decided once, in its
:class:`icd.method.modes.Plan`; these functions take its fields as explicit inputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np

from icd.config import PolicyConfig, SelectionConfig, VotingConfig
from icd.method.modes import Plan
from icd.method.policy import PolicyState, decide_queries
from icd.method.selection import select_demos
from icd.method.types import Generation
from icd.method.uncertainty import uncertainty
from icd.method.voting import VoteResult, aggregate


class AnnotationLike(Protocol):
    """What a teacher returns per sample (``icd.models.base.Annotation`` has this shape)."""

    generations: list[Generation]
    error: str | None


def student_outputs(
    gens: Sequence[Generation], measure: str
) -> tuple[list[str | None], np.ndarray]:
    """The student's answers (stripped) and their uncertainty under ``measure``; a failed
    generation (``error`` set: a remote student's request failed) gives None and NaN, so
    the policy skips it and the sample keeps its other answer."""
    unc = np.asarray(uncertainty(gens, measure), dtype=np.float64)
    failed = np.array([g.error is not None for g in gens], dtype=bool)
    unc[failed] = np.nan
    return [None if g.error else g.text.strip() for g in gens], unc


def select_queries(
    uncertainties: np.ndarray,
    state: PolicyState,
    policy: PolicyConfig,
    stream_length: int | None,
    valid: np.ndarray | None = None,
) -> tuple[np.ndarray, PolicyState]:
    """Which samples of the chunk the budgeted policy sends to the teacher, and the policy
    state after the chunk.

    Only ``valid`` samples (all when None) are seen by the policy; the values of the others
    are ignored (they may be NaN) and they are never queried.
    """
    u = np.asarray(uncertainties, dtype=np.float64).ravel()
    if policy.invert:  # the ablation: the most certain samples look the most uncertain
        u = -u
    ok = np.ones(len(u), dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    if ok.shape != u.shape:
        raise ValueError("valid must align with uncertainties")
    out = np.zeros(len(u), dtype=bool)
    decided, new_state = decide_queries(u[ok], state, policy, stream_length)
    out[ok] = decided
    return out, new_state


def teacher_queries(
    n: int,
    *,
    queries: str,
    uncertainties: np.ndarray | None,
    state: PolicyState,
    policy: PolicyConfig,
    stream_length: int | None,
) -> tuple[np.ndarray, PolicyState]:
    """Which of a chunk's ``n`` valid samples the teacher answers, and the policy state
    after the chunk: all of them when ``queries`` is ``all`` (teacher zero-shot, outside any
    budget), those the budgeted policy picks (:func:`select_queries`) when it is ``budget``,
    none otherwise (:class:`icd.method.modes.Plan`). Samples whose uncertainty is NaN (the
    student failed to answer) are not seen by the policy and never queried."""
    if queries == "all":
        return np.ones(n, dtype=bool), state
    if queries != "budget" or n == 0 or uncertainties is None:
        return np.zeros(n, dtype=bool), state
    u = np.asarray(uncertainties, dtype=np.float64)
    return select_queries(u, state, policy, stream_length, valid=~np.isnan(u))


def vote_annotations(
    annotations: Sequence[AnnotationLike],
    cfg: VotingConfig,
    class_names: Sequence[str] | None = None,
    synonyms: Mapping[str, Sequence[str]] | None = None,
    task: str = "classification",
) -> list[VoteResult]:
    """One vote per teacher annotation (:func:`icd.method.voting.aggregate` for ``task``: a
    consensus caption for captioning); a failed annotation gives a label-less result with
    ``error`` set (the sample falls back to the student)."""
    out = []
    for a in annotations:
        if a.error is not None:
            out.append(VoteResult(None, [], 0.0, False, error=a.error))
        else:
            out.append(aggregate(a.generations, cfg, class_names, synonyms, task=task))
    return out


def pool_mask(votes: Sequence[VoteResult | None]) -> np.ndarray:
    """Which voted samples may enter the demonstration pool: accepted, with a label."""
    return np.array([v is not None and v.accepted and bool(v.label) for v in votes], dtype=bool)


def icl_mask(votes: Sequence[VoteResult | None], *, forward_labels: bool) -> np.ndarray:
    """Which samples need an answer from demonstrations for their final answer: all but
    those that take their teacher label as final (``forward_labels``)."""
    return np.array(
        [not (forward_labels and v is not None and v.label is not None) for v in votes],
        dtype=bool,
    )


def needs_query_text(sel: SelectionConfig, *, pool_size: int) -> bool:
    """Whether demo selection reads the query's text embedding (of the student's zero-shot
    answer): the combined and cascade strategies with a text weight, over a non-empty pool."""
    return sel.w_tt != 0 and sel.strategy in ("combined", "cascade") and pool_size > 0


def choose_demos(
    query_img: np.ndarray,
    query_txt: np.ndarray | None,
    pool_img: np.ndarray,
    pool_txt: np.ndarray,
    pool_labels: Sequence[str] | np.ndarray,
    *,
    selection: SelectionConfig,
    seed: int,
    query_ids: Sequence[str] | None = None,
    candidates: Sequence[np.ndarray] | None = None,
) -> list[np.ndarray]:
    """Demo pool rows for each query row (ordered for the prompt) by ``selection``, ranked
    among each query's ``candidates`` when given (an approximate index's shortlist); see
    :func:`icd.method.selection.select_demos`."""
    return select_demos(
        query_img, query_txt, pool_img, pool_txt, pool_labels, selection, seed, query_ids,
        candidates=candidates,
    )  # fmt: skip


def pool_vote(labels: Sequence[str], *, most_similar_last: bool = True) -> str | None:
    """The majority label of one query's demos, given in prompt order (the order
    :func:`choose_demos` returns; with ``most_similar_last`` the best-ranked demo comes
    last). A tie goes to the tied label of the best-ranked demo; no demos give None."""
    ranked = list(reversed(labels)) if most_similar_last else list(labels)
    if not ranked:
        return None
    counts: dict[str, int] = {}
    for label in ranked:
        counts[label] = counts.get(label, 0) + 1
    top = max(counts.values())
    return next(label for label in ranked if counts[label] == top)


def final_answers(
    plan: Plan,
    zs_answers: Sequence[str | None],
    icl_answers: Sequence[str | None] | None = None,
    votes: Sequence[VoteResult | None] | None = None,
    teacher_zs: Sequence[VoteResult | None] | None = None,
) -> list[tuple[str | None, str | None]]:
    """Each sample's final answer and its source under ``plan``, aligned with
    ``zs_answers``.

    Sources: ``teacher`` (the voted label, when the plan forwards labels), ``student_icl``
    (``pool_vote`` when the demos' majority label answers), ``student_zs``, ``teacher_zs``
    (the teacher answers every sample), ``student_fallback`` (the teacher was to provide
    the answer but failed: the student's answer instead). Missing answers are None; a
    sample with no answer at all gets ``(None, None)``.
    """
    n = len(zs_answers)
    icl = list(icl_answers) if icl_answers is not None else [None] * n
    vs = list(votes) if votes is not None else [None] * n
    tzs = list(teacher_zs) if teacher_zs is not None else [None] * n
    if not (len(icl) == len(vs) == len(tzs) == n):
        raise ValueError("final_answers inputs must align")
    forward = plan.forward_labels
    icl_source = "pool_vote" if plan.icl == "pool_vote" else "student_icl"

    out: list[tuple[str | None, str | None]] = []
    for zs, ic, v, t in zip(zs_answers, icl, vs, tzs, strict=True):
        if plan.queries == "all":
            if t is not None and t.label is not None:
                out.append((t.label, "teacher_zs"))
            elif zs is not None:
                out.append((zs, "student_fallback"))
            else:
                out.append((None, None))
            continue
        if forward and v is not None and v.label is not None:
            out.append((v.label, "teacher"))
            continue
        if plan.uses_icl and ic is not None:
            answer, source = ic, icl_source
        elif zs is not None:
            answer, source = zs, "student_zs"
        else:
            out.append((None, None))
            continue
        if forward and v is not None and v.error is not None:
            source = "student_fallback"
        out.append((answer, source))
    return out
