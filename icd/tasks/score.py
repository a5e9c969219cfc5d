"""Stage ``score``: the student's zero-shot answers and their uncertainty (they feed the
query policy and are every sample's fallback answer)."""

from __future__ import annotations

from dataclasses import dataclass

from icd.data.types import Chunk
from icd.method import steps
from icd.method.types import Generation
from icd.models import counting_image_cache, load_student
from icd.models.finetune import parameter_count
from icd.tasks.base import MODEL_RETRIES, stage, stage_cache, zero_shot_prompts
from icd.tasks.context import ChunkWork, ResumeState, RunContext
from icd.tasks.runner import Pending, Runner

# the hf student's processed-image cache (icd.models.image_cache), computed results only
COUNTERS = ("student_image_cache_hits", "student_image_cache_misses")


@dataclass(frozen=True)
class Scored:
    generations: list[Generation]  # rows in ``chunk.valid`` order
    params: int  # the student's weights
    image_cache: dict[str, int] | None  # hits and misses (None: no cache)


def _adapter_input(p: dict) -> object:
    return p.get("adapter")


@stage(
    "score",
    cache_policy=stage_cache(
        "models.student", "method.list_classes_in_prompt", inputs=_adapter_input
    ),
    **MODEL_RETRIES,
)
def score(*, ctx: RunContext, chunk: Chunk, adapter: str | None = None) -> Scored:
    """The student's zero-shot answer (with token statistics) for each valid sample, with
    the LoRA ``adapter`` merged in when given."""
    prompts = zero_shot_prompts(
        chunk.valid, task_type=ctx.task_type, class_names=ctx.prompt_classes
    )
    student = load_student(ctx.cfg.models.student, adapter)
    with counting_image_cache(student) as cache:
        gens = student.generate(prompts) if prompts else []
    return Scored(gens, parameter_count(student), cache or None)


def submit(runner: Runner, ctx: RunContext, *, chunk: Chunk) -> Pending[Scored] | None:
    """Start the chunk's zero-shot answers ahead of the sequential stages, unless the
    plan's student answers later (it adapts to the pool) or not at all."""
    if not ctx.plan.score_ahead:
        return None
    return runner.ahead(score, ctx=ctx, chunk=chunk)


def collect(runner: Runner, ctx: RunContext, *, work: ChunkWork, state: ResumeState) -> None:
    """The chunk's zero-shot answers and their uncertainty (an adapting student answers
    now, with the adapter after the previous chunk)."""
    if work.scoring is not None:
        run = runner.wait(work.scoring)
    elif ctx.plan.score:
        run = runner.now(score, ctx=ctx, chunk=work.chunk, adapter=state.adapter)
    else:  # the teacher answers every sample: the student is idle
        work.zs_answers = [None] * len(work.valid)
        return
    zs = run.value
    if not zs.generations:
        work.zs_answers = [None] * len(work.valid)
        return
    if zs.image_cache and not run.cached:
        state.counters.add("student_image_cache_hits", zs.image_cache["hits"])
        state.counters.add("student_image_cache_misses", zs.image_cache["misses"])
    state.student_params = zs.params
    work.zs_prompt_tokens = [g.prompt_tokens or None for g in zs.generations]
    work.student_errors = [g.error for g in zs.generations]
    work.zs_answers, work.zs_unc = steps.student_outputs(zs.generations, ctx.cfg.method.uncertainty)
