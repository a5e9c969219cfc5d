"""Stage ``adapt`` (the fine-tuning modes): LoRA steps on the pool as it is after the
chunk; the next chunks' student passes use the new adapter (committed with the chunk)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from icd.data.images import load_image
from icd.data.types import Chunk
from icd.method.prompts import build_prompt
from icd.models import load_student
from icd.storage.pool import PoolView
from icd.tasks.base import MODEL_RETRIES, TaskParameters, open_pool, stage, stage_cache
from icd.tasks.context import RunContext, chain
from icd.tasks.icl import pool_key
from icd.tasks.runner import Runner

COUNTERS: tuple[str, ...] = ()


@dataclass(frozen=True)
class Adapted:
    adapter: str  # the adapter's folder
    steps: int
    tokens: int
    flops: float
    peak_rss_mb: float


def _adapt_inputs(p: TaskParameters) -> object:
    return [p["ctx"].run_id, p["pool_key"], p["start"]]


@stage(
    "adapt",
    cache_policy=stage_cache("models.student", "method.finetune", "seed", inputs=_adapt_inputs),
    **MODEL_RETRIES,
)
def adapt(
    *, ctx: RunContext, chunk: Chunk, start: str | None, view: PoolView, pool_key: str
) -> Adapted:
    """LoRA steps on ``view``, the run's pool after this chunk's commit (all its rows, or the
    latest ``method.finetune.window``; ``pool_key`` stands for it in the cache key), starting
    from the adapter at ``start``; the adapter is saved under the run's
    ``adapters/chunk-NNNNN``. Each training round is appended to the run's adaptation ledger
    (``adapt_calls.jsonl``), so a resumed run can show it trained no chunk twice."""
    from icd.models.finetune import train_adapter

    fcfg = ctx.cfg.method.finetune
    table = open_pool(ctx.pool_uri)
    ids = [str(i) for i in view.ids]
    if fcfg.replay == "window":
        ids = ids[-fcfg.window :]
    rows = table.fetch(sorted(ids), ctx.run_id) if ids else []
    examples = [
        (
            build_prompt(
                r["question"], load_image(r["image"]), task=ctx.task_type,
                class_names=ctx.prompt_classes,
            ),
            r["label"],
        )
        for r in rows
    ]  # fmt: skip
    out = ctx.run_dir / "adapters" / f"chunk-{chunk.index:05d}"
    student = load_student(ctx.cfg.models.student)
    cost = train_adapter(
        vlm=student,
        examples=examples,
        start=Path(start) if start else None,
        out=out,
        cfg=fcfg,
        seed=ctx.cfg.seed * 100_003 + chunk.index,
    )
    with (ctx.run_dir / "adapt_calls.jsonl").open("a") as f:
        f.write(json.dumps({"chunk": chunk.index, "chunk_key": chunk.key, **asdict(cost)}) + "\n")
    return Adapted(
        adapter=str(out),
        steps=cost.steps,
        tokens=cost.tokens,
        flops=cost.flops,
        peak_rss_mb=cost.peak_rss_mb,
    )


def run(
    runner: Runner, ctx: RunContext, *, chunk: Chunk, start: str | None, lineage: str
) -> Adapted | None:
    """In the plans that adapt: train, from the adapter at ``start``, on the pool after
    this chunk (``lineage``: the content of the chunks before it). None in other plans."""
    if not ctx.plan.adapt:
        return None
    view = open_pool(ctx.pool_uri).view(ctx.run_id, before_chunk=chunk.index + 1)
    after = chain(lineage, chunk.key)
    return runner.now(
        adapt,
        ctx=ctx,
        chunk=chunk,
        start=start,
        view=view,
        pool_key=pool_key(view, lineage=after),
    ).value
