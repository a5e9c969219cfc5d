"""Stage ``icl``: demonstrations are chosen from the pool as it was before the chunk, and
answer the samples whose final answer needs them — through a second student pass with
them in the prompt, or (``pool_vote``) as their majority label."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from PIL import Image

from icd.data.images import image_id, load_image
from icd.data.types import Chunk
from icd.method import steps
from icd.method.icl_gate import gate_icl
from icd.method.prompts import build_prompt
from icd.models import counting_image_cache, load_embedder, load_student
from icd.storage.pool import PoolView, ann
from icd.tasks.base import MODEL_RETRIES, finite_or_none, open_pool, stage, stage_cache
from icd.tasks.context import ChunkWork, ResumeState, RunContext
from icd.tasks.runner import Runner

COUNTERS = (
    "student_image_cache_hits",
    "student_image_cache_misses",
    "icl_prompts",  # student prompts with demonstrations this run sent (not cached results)
)


@dataclass(frozen=True)
class Demonstrated:
    """Per answered row (the ``rows`` given to :func:`icl`, in order): its demos, and the
    answer they gave, with its uncertainty, prompt tokens and error (a student pass; None
    for a majority label)."""

    demo_ids: list[list[str]]
    demo_labels: list[list[str]]
    answers: list[str | None]
    uncertainties: list[float | None]
    prompt_tokens: list[int | None]
    errors: list[str | None]
    image_cache: dict[str, int] | None = None


def demo_view(ctx: RunContext, *, work: ChunkWork) -> PoolView | None:
    """The pool as it was before this chunk, when the plan answers with demonstrations
    (taken before this chunk's pool commit, which holds the pool's lock)."""
    if not (ctx.plan.uses_icl and work.valid):
        return None
    return open_pool(ctx.pool_uri).view(ctx.run_id, before_chunk=work.chunk.index)


def pool_key(view: PoolView, *, lineage: str) -> str:
    """Fingerprint of a pool view's content: which rows, with which labels, and the content
    of the chunks they came from (``lineage``, the hash chain of the run's chunk keys),
    which fixes their images and questions."""
    text = "\n".join(f"{i}\t{label}" for i, label in zip(view.ids, list(view.labels), strict=True))
    return hashlib.sha256(f"{lineage}\n{text}".encode()).hexdigest()[:16]


def _icl_inputs(p: dict[str, Any]) -> Any:
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
) -> Demonstrated:
    """For the valid samples at ``rows``: choose demonstrations from ``view``, the pool as it
    was before this chunk (``pool_key`` fingerprints its content and stands for it in the
    cache key), then answer with them (the student with its LoRA ``adapter`` when given)."""
    valid = [chunk.valid[i] for i in rows]
    if not valid:
        return Demonstrated([], [], [], [], [], [])
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
    if plan.icl == "demo_vote":  # the demos' majority label answers; no student pass
        labels = [[str(view.labels[j]) for j in idx] for idx in chosen]
        last = plan.selection.most_similar_last
        answers = [steps.demo_vote(ls, most_similar_last=last) for ls in labels]
        return Demonstrated(demo_ids, labels, answers, none, none, none)
    needed = sorted({d for ids in demo_ids for d in ids})
    table = open_pool(ctx.pool_uri)
    by_id = {r["sample_id"]: r for r in table.fetch(needed, ctx.run_id)} if needed else {}
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
    student = load_student(ctx.cfg.models.student, adapter)
    with counting_image_cache(student) as cache:
        gens = student.generate(prompts)
    answers, unc = steps.student_outputs(gens, ctx.cfg.method.uncertainty)
    return Demonstrated(
        demo_ids=demo_ids,
        demo_labels=[[by_id[d]["label"] for d in ids] for ids in demo_ids],
        answers=answers,
        uncertainties=[finite_or_none(x) for x in unc],
        prompt_tokens=[g.prompt_tokens or None for g in gens],
        errors=[g.error for g in gens],
        image_cache=cache or None,
    )


def run(
    runner: Runner,
    ctx: RunContext,
    *,
    work: ChunkWork,
    state: ResumeState,
    view: PoolView | None,
) -> None:
    """Answer, with demonstrations chosen from ``view``, the samples whose final answer
    needs them (not those that take their teacher label, nor those the ICL gate leaves
    with their zero-shot answer)."""
    if view is None:
        return
    votes = [work.votes.get(s.sample_id) for s in work.valid]
    need = steps.icl_mask(votes, forward_labels=ctx.plan.forward_labels)
    work.icl_rows = [i for i, n in enumerate(need) if n]
    if ctx.plan.icl_gate is not None:  # the confident ones keep their zero-shot answer
        work.icl_rows, work.icl_gated, state.icl_gate = gate_icl(
            work.icl_rows, work.zs_unc, state=state.icl_gate, gate=ctx.plan.icl_gate
        )
    done = runner.now(
        icl,
        ctx=ctx,
        chunk=work.chunk,
        rows=work.icl_rows,
        image_vecs=work.image_vecs,
        zs_answers=work.zs_answers,
        view=view,
        pool_key=pool_key(view, lineage=state.lineage),
        adapter=state.adapter,
    )
    work.icl = done.value
    if ctx.plan.icl == "student" and not done.cached:
        state.counters.add("icl_prompts", len(work.icl_rows))
    cache = done.value.image_cache
    if cache and not done.cached:
        state.counters.add("student_image_cache_hits", cache["hits"])
        state.counters.add("student_image_cache_misses", cache["misses"])
