"""Stage ``pool``: the chunk's admitted annotations enter the demonstration pool, as one
pool commit, in the background while the student answers with the pool as it was before
the chunk; then ``method.pool``'s curation (label audit, cap) marks the rows that leave
selection, in commits of their own, so the next chunk sees at most ``max_rows`` rows."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from icd.config import ModelConfig
from icd.data.types import Chunk
from icd.method import curation, steps
from icd.method.voting import VoteResult
from icd.models import load_embedder
from icd.storage.pool.schema import PoolRow
from icd.tasks.annotate import Labels
from icd.tasks.base import open_pool, stage
from icd.tasks.context import RunContext
from icd.tasks.runner import Pending, Runner
from icd.tasks.zero_shot import Answers

COUNTERS = (
    "pool_evicted",  # rows evicted for method.pool.max_rows
    "pool_excluded",  # rows excluded by the label audit
)


@dataclass(frozen=True)
class Pooled:
    version: int  # the pool's version after the chunk's commits
    added: int  # rows upserted
    evicted: int = 0  # rows the chunk's curation evicted (the cap)
    excluded: int = 0  # rows the chunk's curation excluded (the label audit)

    @property
    def counts(self) -> dict[str, int]:
        """This stage's counters for the chunk."""
        return {"pool_evicted": self.evicted, "pool_excluded": self.excluded}


def teacher_provenance(cfg: ModelConfig) -> str:
    """Who labels a pool row: ``oracle(noise=0.1)`` for the ground-truth oracle,
    ``MODEL_ID@REVISION`` for a Hugging Face teacher, ``openai:MODEL_ID@BASE_URL`` for an
    OpenAI-compatible endpoint."""
    if cfg.backend == "oracle":
        from icd.models.oracle import provenance

        return provenance(cfg.noise)
    if cfg.backend == "openai":
        return f"openai:{cfg.model_id}@{cfg.base_url or 'https://api.openai.com/v1'}"
    return f"{cfg.model_id}@{cfg.revision}"


@stage(
    "pool",
    cache_policy=NO_CACHE,  # it writes; an upsert is idempotent on the sample id
    persist=False,
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=0.5),
)
def pool(
    *,
    ctx: RunContext,
    chunk: Chunk,
    votes: dict[str, VoteResult],
    image_vecs: np.ndarray,
    uncertainties: np.ndarray | None,
) -> Pooled:
    """Upsert the chunk's annotations that the method admits to the pool
    (:func:`icd.method.steps.pool_mask`) as one pool commit, embedding each label with the
    embedder's text tower and recording the teacher (:func:`teacher_provenance`) as each
    row's provenance; then curate the pool (:func:`curate`). Run again for the same chunk
    (a retry, a resumed run) it leaves the same rows and marks."""
    table = open_pool(ctx.pool_uri)
    valid = chunk.valid
    admit = steps.pool_mask([votes.get(s.sample_id) for s in valid])
    accepted = [(int(i), votes[valid[i].sample_id]) for i in np.flatnonzero(admit)]
    if not accepted:
        return Pooled(table.version(), 0)
    labels = [v.label or "" for _, v in accepted]
    label_vecs = load_embedder(ctx.cfg.models.embedder).embed_texts(labels)
    now = datetime.now(UTC)
    teacher = teacher_provenance(ctx.cfg.models.teacher)
    rows: list[PoolRow] = [
        {
            "sample_id": valid[i].sample_id,
            "run_id": ctx.run_id,
            "chunk": chunk.index,
            "stream_pos": valid[i].stream_pos,
            "image": valid[i].image_bytes,
            "question": valid[i].question,
            "image_vec": image_vecs[i],
            "label": v.label or "",  # never empty: pool_mask admits labelled votes only
            "label_vec": label_vec,
            "votes": v.votes,
            "agreement": v.agreement,
            "uncertainty": float(uncertainties[i]) if uncertainties is not None else None,
            "teacher": teacher,
            "created_at": now,
        }
        for (i, v), label_vec in zip(accepted, label_vecs, strict=True)
    ]
    version = table.upsert(rows)
    done = curate(ctx, chunk=chunk.index)
    table.maybe_compact(ctx.cfg.storage.compact_every)
    return Pooled(max(version, done.version), len(rows), len(done.evicted), len(done.excluded))


@dataclass(frozen=True)
class Curated:
    version: int  # the pool's version after the curation's commits
    evicted: tuple[str, ...] = ()
    excluded: tuple[str, ...] = ()


def curate(ctx: RunContext, *, chunk: int) -> Curated:
    """Apply ``method.pool``'s curation (:func:`icd.method.curation.curate`) to the run's
    pool after chunk ``chunk``'s admissions — the live rows before the chunk's own
    curation (so a repeated chunk decides the same), with every row admitted so far as the
    audit's evidence — and mark its decision in the pool."""
    table = open_pool(ctx.pool_uri)
    rules = ctx.cfg.method.pool
    if not rules.curates:
        return Curated(table.version())
    admitted = table.view(ctx.run_id, before_chunk=chunk + 1, curated_before=0)
    live = table.view(ctx.run_id, before_chunk=chunk + 1, curated_before=chunk)
    decided = curation.curate(
        ids=admitted.ids,
        labels=admitted.labels,
        image_vecs=admitted.image_vecs,
        stream_pos=admitted.stream_pos,
        rules=rules,
        live=np.isin(admitted.ids, live.ids),
    )
    version = table.mark(ctx.run_id, chunk=chunk, reasons=decided.reasons)
    return Curated(version, decided.evicted, decided.excluded)


def submit(
    runner: Runner,
    ctx: RunContext,
    *,
    chunk: Chunk,
    labels: Labels,
    image_vecs: np.ndarray,
    answers: Answers,
) -> Pending[Pooled] | None:
    """Start the chunk's pool commit of its teacher ``labels`` in the background (when the
    plan keeps a pool and the teacher labelled something); rows keep the samples'
    ``image_vecs`` and zero-shot uncertainty."""
    if not (ctx.plan.pool and labels.votes):
        return None
    return runner.background(
        pool,
        ctx=ctx,
        chunk=chunk,
        votes=labels.votes,
        image_vecs=image_vecs,
        uncertainties=answers.uncertainty,
    )


def collect(runner: Runner, *, pending: Pending[Pooled] | None) -> Pooled | None:
    """Wait for the chunk's pool commit (None: the chunk made none)."""
    return None if pending is None else runner.wait(pending).value
