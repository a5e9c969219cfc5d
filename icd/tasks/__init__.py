"""The stream's stages, one module each — ``embed``, ``zero_shot``, ``annotate``,
``pool``, ``icl``, ``adapt``, ``evaluate`` — each holding its Prefect task (working on a
whole chunk, named after the stage), its typed results, and the step the flow calls: the
step takes the results it reads as parameters and returns its own. The stage's
name is its module, its task, its timing key (``seconds.NAME`` in the summary) and its
log name.

Stages are thin: they load models through the process-level cache in :mod:`icd.models`
(so a worker loads a model once), call the pure method code in :mod:`icd.method` for every
rule, and do the I/O. The run's facts, the resume state and the teacher ledger are in
:mod:`.context`; :mod:`.runner` runs and books the tasks. The flow, whose body is the
stage diagram, is :mod:`icd.flows.stream`.
"""

from icd.tasks import adapt, annotate, embed, evaluate, icl, pool, zero_shot

# Every counter a stage declares, each once, in stage order.
COUNTERS: tuple[str, ...] = tuple(
    dict.fromkeys(
        c
        for stage in (embed, zero_shot, annotate, pool, icl, adapt, evaluate)
        for c in stage.COUNTERS
    )
)

__all__ = ["COUNTERS", "adapt", "annotate", "embed", "evaluate", "icl", "pool", "zero_shot"]
