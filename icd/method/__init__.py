"""The ICD method core: pure functions over arrays and records (no Prefect, LanceDB or MLflow).

Modules: ``uncertainty`` (docs/design.md §2.2), ``policy`` (§2.3), ``voting`` (§2.4),
``selection`` (§2.6), ``prompts`` (§2.7), ``metrics`` (§2.9: scores), ``accounting``
(§2.9: every run-level number), ``modes`` (§2.10: a run's :class:`Plan`), ``steps`` (the
chunk-level functions the stages wire), ``types`` (records shared with the model backends).
"""

from icd.method.metrics import demo_accuracy, score, vqa_accuracy
from icd.method.modes import MODES, ModeSpec, Plan, mode_spec, plan
from icd.method.policy import PolicyState, budget_cap, decide_queries
from icd.method.prompts import build_prompt, format_question
from icd.method.selection import select_demos, similarities
from icd.method.types import Generation, Prompt
from icd.method.uncertainty import MEASURES, uncertainty
from icd.method.voting import VoteResult, aggregate, map_to_class, normalize_answer

__all__ = [
    "MEASURES",
    "MODES",
    "Generation",
    "ModeSpec",
    "Plan",
    "PolicyState",
    "Prompt",
    "VoteResult",
    "aggregate",
    "budget_cap",
    "build_prompt",
    "decide_queries",
    "demo_accuracy",
    "format_question",
    "map_to_class",
    "mode_spec",
    "plan",
    "normalize_answer",
    "score",
    "similarities",
    "select_demos",
    "uncertainty",
    "vqa_accuracy",
]
