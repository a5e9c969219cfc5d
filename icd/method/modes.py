"""What each run mode runs (docs/design.md §2.10): the baselines and full ICD share one flow.

The oracle upper bound is not a mode: it is mode ``icd`` with the oracle teacher backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from icd.config import IclGateConfig, MethodConfig, SelectionConfig, VotingConfig


@dataclass(frozen=True)
class ModeSpec:
    """The stages a mode runs.

    - ``student_zero_shot``: the student answers each sample without demos (its answer and
      uncertainty feed the policy and are the fallback answer).
    - ``query_teacher``: the budgeted query policy picks samples and the teacher votes on them.
    - ``use_pool``: accepted annotations are added to the demonstration pool.
    - ``use_icl``: the student answers again with demos selected from the pool.
    - ``selection``: strategy that overrides ``method.selection.strategy`` (None: keep it).
    - ``teacher_on_all``: the teacher answers every sample zero-shot (one greedy answer),
      outside any budget; that answer is final.
    - ``final_from_teacher``: a sample with a teacher label takes it as its final answer
      regardless of ``method.final_from_teacher`` (True for forwarding baselines).
    - ``pool_vote``: demonstrations are chosen as for ICL, but the answer is the majority
      label of the chosen demos (:func:`icd.method.steps.pool_vote`), not a student pass:
      the trivial use of the same pool that ICL must beat.
    - ``adapt_student``: after each chunk's pool commit the student's LoRA adapter takes a
      few optimisation steps on the pool's labels, and the next chunks' student passes use
      it (the ICL-vs-fine-tuning baselines).
    """

    name: str
    student_zero_shot: bool = True
    query_teacher: bool = True
    use_pool: bool = True
    use_icl: bool = True
    selection: str | None = None
    teacher_on_all: bool = False
    final_from_teacher: bool = False
    pool_vote: bool = False
    adapt_student: bool = False

    @property
    def uses_budget(self) -> bool:
        """Whether the annotation budget applies (the teacher is queried within it)."""
        return self.query_teacher and not self.teacher_on_all


MODES: dict[str, ModeSpec] = {
    "icd": ModeSpec("icd"),
    "student_zero_shot": ModeSpec(
        "student_zero_shot", query_teacher=False, use_pool=False, use_icl=False
    ),
    "teacher_zero_shot": ModeSpec(
        "teacher_zero_shot",
        student_zero_shot=False,
        query_teacher=False,
        use_pool=False,
        use_icl=False,
        teacher_on_all=True,
    ),
    "teacher_forward": ModeSpec(
        "teacher_forward", use_pool=False, use_icl=False, final_from_teacher=True
    ),
    "random_demos": ModeSpec("random_demos", selection="random"),
    "rices": ModeSpec("rices", selection="rices"),
    "pool_vote": ModeSpec("pool_vote", pool_vote=True),
    "finetune_lora": ModeSpec("finetune_lora", use_icl=False, adapt_student=True),
    "finetune_lora_icd": ModeSpec("finetune_lora_icd", adapt_student=True),
}


def mode_spec(name: str) -> ModeSpec:
    """The spec of a mode name; ``ValueError`` naming the known modes otherwise."""
    try:
        return MODES[name]
    except KeyError:
        raise ValueError(f"unknown mode {name!r} (known: {', '.join(MODES)})") from None


def selection_config(cfg: MethodConfig) -> SelectionConfig:
    """``cfg.selection`` with the mode's strategy override applied."""
    spec = mode_spec(cfg.mode)
    if spec.selection is None or spec.selection == cfg.selection.strategy:
        return cfg.selection
    return cfg.selection.model_copy(update={"strategy": spec.selection})


@dataclass(frozen=True)
class Plan:
    """What one run does, decided once from its method config (:func:`plan`); the stages
    and steps read these fields instead of re-deriving them from the mode's name.

    - ``zero_shot``: the student answers each sample zero-shot; ``zero_shot_ahead``: those
      answers may be computed before the previous chunk finishes (not for a student that adapts to
      the pool).
    - ``queries``: who the teacher answers: ``budget`` (the samples the budgeted policy
      picks), ``all`` (every sample, one greedy answer, outside any budget: teacher
      zero-shot), or ``none``. ``voting`` is how it answers them.
    - ``pool``: admitted annotations enter the demonstration pool.
    - ``icl``: how demonstrations answer: ``student`` (a second student pass with them in
      the prompt), ``pool_vote`` (their majority label) or ``none``; ``selection`` chooses
      them. ``icl_gate``: which of the samples the student pass would answer get it (None:
      all of them; :mod:`icd.method.icl_gate`).
    - ``forward_labels``: a sample with a teacher label takes it as its final answer.
    - ``adapt``: LoRA steps on the pool after each chunk.
    """

    mode: str
    zero_shot: bool
    zero_shot_ahead: bool
    queries: Literal["budget", "all", "none"]
    voting: VotingConfig
    pool: bool
    icl: Literal["student", "pool_vote", "none"]
    selection: SelectionConfig
    icl_gate: IclGateConfig | None
    forward_labels: bool
    adapt: bool

    @property
    def uses_icl(self) -> bool:
        """Whether demonstrations are chosen from the pool to answer samples."""
        return self.icl != "none"


def plan(cfg: MethodConfig) -> Plan:
    """The :class:`Plan` of a method config (``ValueError`` on an unknown mode)."""
    spec = mode_spec(cfg.mode)
    voting = cfg.voting
    if spec.teacher_on_all:  # one greedy answer per sample, always accepted
        voting = voting.model_copy(
            update={"n": 1, "temperature": 0.0, "include_greedy": True, "a_min": 0.0}
        )
    queries: Literal["budget", "all", "none"] = (
        "all" if spec.teacher_on_all else "budget" if spec.query_teacher else "none"
    )
    icl: Literal["student", "pool_vote", "none"] = (
        "none" if not spec.use_icl else "pool_vote" if spec.pool_vote else "student"
    )
    return Plan(
        mode=spec.name,
        zero_shot=spec.student_zero_shot,
        zero_shot_ahead=spec.student_zero_shot and not spec.adapt_student,
        queries=queries,
        voting=voting,
        pool=spec.use_pool,
        icl=icl,
        selection=selection_config(cfg),
        # The gate saves student passes; a demo vote makes none.
        icl_gate=cfg.icl_gate if icl == "student" and cfg.icl_gate.mode != "always" else None,
        forward_labels=spec.query_teacher and (spec.final_from_teacher or cfg.final_from_teacher),
        adapt=spec.adapt_student,
    )
