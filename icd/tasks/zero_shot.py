"""Stage ``zero_shot``: the student's zero-shot answers and their uncertainty (they feed
the query policy and are every sample's fallback answer)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from icd.data.types import Chunk
from icd.method import steps
from icd.method.types import Generation
from icd.models import counting_image_cache, load_student
from icd.models.finetune import parameter_count
from icd.tasks.base import (
    MODEL_RETRIES,
    TaskParameters,
    stage,
    stage_cache,
    zero_shot_prompts,
)
from icd.tasks.context import RunContext
from icd.tasks.runner import Pending, Runner

# the hf student's processed-image cache (icd.models.image_cache), computed results only
COUNTERS = ("student_image_cache_hits", "student_image_cache_misses")


@dataclass(frozen=True)
class StudentPass:
    """The task's result (persisted in the task cache)."""

    generations: list[Generation]  # rows in ``chunk.valid`` order
    params: int  # the student's weights
    image_cache: dict[str, int] | None  # hits and misses (None: no cache)


@dataclass(frozen=True)
class Answers:
    """The student's zero-shot answers of a chunk's valid samples (rows in ``chunk.valid``
    order): each answer (None where the student did not answer), its uncertainty (None
    when no sample was answered; NaN where one failed), prompt tokens and error."""

    answers: list[str | None]
    uncertainty: np.ndarray | None
    prompt_tokens: list[int | None]
    errors: list[str | None]
    params: int | None = None  # the student's weights (None: no student pass)
    counts: dict[str, int] = field(default_factory=dict)  # this stage's counters

    @classmethod
    def none(cls, n: int) -> Answers:
        """No zero-shot answers for ``n`` samples (the student is idle)."""
        return cls([None] * n, None, [None] * n, [None] * n)


def _adapter_input(p: TaskParameters) -> object:
    return p.get("adapter")


@stage(
    "zero_shot",
    cache_policy=stage_cache(
        "models.student", "method.list_classes_in_prompt", inputs=_adapter_input
    ),
    **MODEL_RETRIES,
)
def zero_shot(*, ctx: RunContext, chunk: Chunk, adapter: str | None = None) -> StudentPass:
    """The student's zero-shot answer (with token statistics) for each valid sample, with
    the LoRA ``adapter`` merged in when given."""
    prompts = zero_shot_prompts(
        chunk.valid, task_type=ctx.task_type, class_names=ctx.prompt_classes
    )
    student = load_student(ctx.cfg.models.student, adapter)
    with counting_image_cache(student) as cache:
        gens = student.generate(prompts) if prompts else []
    return StudentPass(gens, parameter_count(student), cache or None)


def submit(runner: Runner, ctx: RunContext, *, chunk: Chunk) -> Pending[StudentPass] | None:
    """Start the chunk's zero-shot answers ahead of the sequential stages, unless the
    plan's student answers later (it adapts to the pool) or not at all."""
    if not ctx.plan.zero_shot_ahead:
        return None
    return runner.ahead(zero_shot, ctx=ctx, chunk=chunk)


def collect(
    runner: Runner,
    ctx: RunContext,
    *,
    chunk: Chunk,
    pending: Pending[StudentPass] | None,
    adapter: str | None,
) -> Answers:
    """The chunk's zero-shot answers: the ``pending`` ones started ahead, or (a student
    that adapts to the pool) answered now with the ``adapter`` after the previous chunk."""
    if pending is not None:
        run = runner.wait(pending)
    elif ctx.plan.zero_shot:
        run = runner.now(zero_shot, ctx=ctx, chunk=chunk, adapter=adapter)
    else:  # the teacher answers every sample: the student is idle
        return Answers.none(len(chunk.valid))
    out = run.value
    if not out.generations:
        return Answers.none(len(chunk.valid))
    cache = out.image_cache if out.image_cache and not run.cached else {}
    answers, uncertainty = steps.student_outputs(out.generations, ctx.cfg.method.uncertainty)
    return Answers(
        answers=answers,
        uncertainty=uncertainty,
        prompt_tokens=[g.prompt_tokens or None for g in out.generations],
        errors=[g.error for g in out.generations],
        params=out.params,
        counts={f"student_image_cache_{k}": n for k, n in cache.items()},
    )
