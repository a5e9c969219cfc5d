"""Stage ``icl``: demonstrations are chosen from the pool as it was before the chunk, and
answer the samples whose final answer needs them — through a second student pass with
them in the prompt, or (``pool_vote``) as their majority label."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, cast

import numpy as np
from PIL import Image

from icd.data.images import image_id, load_image
from icd.data.types import Chunk, Sample
from icd.method import steps
from icd.method.icl_gate import gate_icl
from icd.method.policy import PolicyState
from icd.method.prompts import build_prompt
from icd.method.types import Prompt
from icd.models import counting_image_cache, load_embedder, load_student
from icd.storage.pool import PoolView, ann
from icd.tasks.annotate import Labels
from icd.tasks.base import (
    MODEL_RETRIES,
    TaskParameters,
    finite_or_none,
    open_pool,
    stage,
    stage_cache,
)
from icd.tasks.context import RunContext
from icd.tasks.runner import Runner
from icd.tasks.zero_shot import Answers

COUNTERS = (
    "student_image_cache_hits",
    "student_image_cache_misses",
    "icl_prompts",  # student prompts with demonstrations this run sent (not cached results)
)


@dataclass(frozen=True)
class DemoAnswers:
    """The task's result (persisted in the task cache). Per answered row (the ``rows``
    given to :func:`icl`, in order): its demos, and the answer they gave, with its
    uncertainty, prompt tokens and error (a student pass; None for a majority label)."""

    demo_ids: list[list[str]]
    demo_labels: list[list[str]]
    answers: list[str | None]
    uncertainties: list[float | None]
    prompt_tokens: list[int | None]
    errors: list[str | None]
    image_cache: dict[str, int] | None = None


@dataclass(frozen=True)
class Demonstrated:
    """A chunk's answers from demonstrations: the valid rows answered with them, the rows
    the ICL gate left with their zero-shot answer, the answers (None: no row answered),
    the gate's state after the chunk and this stage's counters."""

    rows: list[int]
    gated: list[int]
    answered: DemoAnswers | None
    gate: PolicyState
    counts: dict[str, int] = field(default_factory=dict)

    def at(self, row: int, name: str, empty: Any = None) -> Any:
        """Field ``name`` of :class:`DemoAnswers` for valid row ``row`` (``empty`` when the
        row was not answered with demonstrations)."""
        if self.answered is None or row not in self._index:
            return empty
        return getattr(self.answered, name)[self._index[row]]

    @cached_property
    def _index(self) -> dict[int, int]:
        return {r: j for j, r in enumerate(self.rows)}


def demo_view(ctx: RunContext, *, chunk: Chunk) -> PoolView | None:
    """The pool as it was before this chunk, when the plan answers with demonstrations
    (taken before this chunk's pool commit, which holds the pool's lock)."""
    if not (ctx.plan.uses_icl and chunk.valid):
        return None
    return open_pool(ctx.pool_uri).view(ctx.run_id, before_chunk=chunk.index)


def pool_key(view: PoolView, *, lineage: str) -> str:
    """Fingerprint of a pool view's content: which rows, with which labels, and the content
    of the chunks they came from (``lineage``, the hash chain of the run's chunk keys),
    which fixes their images and questions."""
    text = "\n".join(f"{i}\t{label}" for i, label in zip(view.ids, list(view.labels), strict=True))
    return hashlib.sha256(f"{lineage}\n{text}".encode()).hexdigest()[:16]


def _icl_inputs(p: TaskParameters) -> object:
    return [p["rows"], p["pool_key"], p.get("adapter")]


@stage(
    "icl",
    cache_policy=stage_cache(
        "models.student",
        "models.embedder",
        "method.mode",
        "method.selection",
        "method.list_classes_in_prompt",
        "method.uncertainty",
        "seed",
        inputs=_icl_inputs,
    ),
    **MODEL_RETRIES,
)
def icl(
    *,
    ctx: RunContext,
    chunk: Chunk,
    rows: list[int],
    image_vecs: np.ndarray,
    zs_answers: list[str | None],
    view: PoolView,
    pool_key: str,
    adapter: str | None = None,
) -> DemoAnswers:
    """For the valid samples at ``rows``: choose demonstrations from ``view``, the pool as it
    was before this chunk (``pool_key`` fingerprints its content and stands for it in the
    cache key), then answer with them (the student with its LoRA ``adapter`` when given)."""
    valid = [chunk.valid[i] for i in rows]
    if not valid:
        return DemoAnswers([], [], [], [], [], [])
    plan = ctx.plan
    query_txt = None
    if steps.needs_query_text(plan.selection, pool_size=len(view)):
        embedder = load_embedder(ctx.cfg.models.embedder)
        query_txt = embedder.embed_texts([zs_answers[i] or "" for i in rows])
    # Past selection.ann_min_rows rows: rank an approximate index's shortlist (else None).
    shortlist = ann.candidates(view, image_vecs[rows], query_txt, plan.selection)
    chosen = steps.choose_demos(
        image_vecs[rows],
        query_txt,
        view.image_vecs,
        view.label_vecs,
        view.labels,
        selection=plan.selection,
        seed=ctx.cfg.seed,
        query_ids=[s.sample_id for s in valid],
        candidates=shortlist,
    )
    demo_ids = [[str(view.ids[j]) for j in idx] for idx in chosen]
    none: list[Any] = [None] * len(valid)
    if plan.icl == "pool_vote":  # the demos' majority label answers; no student pass
        labels = [[str(view.labels[j]) for j in idx] for idx in chosen]
        last = plan.selection.most_similar_last
        answers = [steps.pool_vote(ls, most_similar_last=last) for ls in labels]
        return DemoAnswers(demo_ids, labels, answers, none, none, none)
    prompts, by_id = _demo_prompts(ctx, valid=valid, demo_ids=demo_ids)
    student = load_student(ctx.cfg.models.student, adapter)
    with counting_image_cache(student) as cache:
        gens = student.generate(prompts)
    answers, unc = steps.student_outputs(gens, ctx.cfg.method.uncertainty)
    return DemoAnswers(
        demo_ids=demo_ids,
        demo_labels=[[by_id[d]["label"] for d in ids] for ids in demo_ids],
        answers=answers,
        uncertainties=[finite_or_none(x) for x in unc],
        prompt_tokens=[g.prompt_tokens or None for g in gens],
        errors=[g.error for g in gens],
        image_cache=cache or None,
    )


def _demo_prompts(
    ctx: RunContext, *, valid: list[Sample], demo_ids: list[list[str]]
) -> tuple[list[Prompt], dict[str, Mapping[str, Any]]]:
    """Each sample's prompt with its demonstrations (read from the pool: image, question,
    label), and those pool rows by sample id."""
    needed = sorted({d for ids in demo_ids for d in ids})
    table = open_pool(ctx.pool_uri)
    rows = table.fetch(needed, ctx.run_id) if needed else []
    by_id: dict[str, Mapping[str, Any]] = {r["sample_id"]: r for r in rows}
    images = {d: load_image(r["image"]) for d, r in by_id.items()}
    names = {d: image_id(d, r["image"]) for d, r in by_id.items()}
    prompts = [
        build_prompt(
            s.question,
            cast(Image.Image, s.image),  # valid: decoded
            [(images[d], by_id[d]["question"] or s.question, by_id[d]["label"]) for d in ids],
            task=ctx.task_type,
            class_names=ctx.prompt_classes,
            image_ids=[*(names[d] for d in ids), image_id(s.sample_id, s.image_bytes)],
        )
        for s, ids in zip(valid, demo_ids, strict=True)
    ]
    return prompts, by_id


def run(
    runner: Runner,
    ctx: RunContext,
    *,
    chunk: Chunk,
    answers: Answers,
    labels: Labels,
    image_vecs: np.ndarray,
    view: PoolView | None,
    gate: PolicyState,
    lineage: str,
    adapter: str | None,
) -> Demonstrated:
    """Answer, with demonstrations chosen from ``view`` (the pool before this chunk, whose
    content ``lineage`` fixes), the samples whose final answer needs them: not those that
    take their teacher label, nor those the ICL gate (state ``gate``) leaves with their
    zero-shot answer. The student answers with its LoRA ``adapter`` when given."""
    if view is None:
        return Demonstrated([], [], None, gate)
    need = steps.icl_mask(
        [labels.vote(s.sample_id) for s in chunk.valid], forward_labels=ctx.plan.forward_labels
    )
    rows: list[int] = [i for i, n in enumerate(need) if n]
    gated: list[int] = []
    if ctx.plan.icl_gate is not None:  # the confident ones keep their zero-shot answer
        rows, gated, gate = gate_icl(rows, answers.uncertainty, state=gate, gate=ctx.plan.icl_gate)
    done = runner.now(
        icl,
        ctx=ctx,
        chunk=chunk,
        rows=rows,
        image_vecs=image_vecs,
        zs_answers=answers.answers,
        view=view,
        pool_key=pool_key(view, lineage=lineage),
        adapter=adapter,
    )
    counts: dict[str, int] = {}
    if not done.cached:  # what this run computed (not results from the task cache)
        cache = done.value.image_cache or {}
        counts = {f"student_image_cache_{k}": n for k, n in cache.items()}
        if ctx.plan.icl == "student":
            counts["icl_prompts"] = len(rows)
    return Demonstrated(rows, gated, done.value, gate, counts)
