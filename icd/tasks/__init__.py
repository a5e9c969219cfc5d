"""The stream's stages, one module each — ``embed``, ``score``, ``annotate``, ``pool``,
``icl``, ``adapt``, ``evaluate`` — each holding its Prefect task (working on a whole
chunk, named after the stage), its typed result, and the step the flow calls. The stage's
name is its module, its task, its timing key (``seconds.NAME`` in the summary) and its
log name.

Stages are thin: they load models through the process-level cache in :mod:`icd.models`
(so a worker loads a model once), call the pure method code in :mod:`icd.method` for every
rule, and do the I/O. The run's facts, one chunk's work and the resume state are in
:mod:`.context`; :mod:`.runner` runs and books the tasks. The flow, whose body is the
stage diagram, is :mod:`icd.flows.stream`.
"""

from icd.tasks import adapt, annotate, embed, evaluate, icl, pool, score

# Every counter a stage declares, each once, in stage order.
COUNTERS: tuple[str, ...] = tuple(
    dict.fromkeys(
        c for stage in (embed, score, annotate, pool, icl, adapt, evaluate) for c in stage.COUNTERS
    )
)

__all__ = ["COUNTERS", "adapt", "annotate", "embed", "evaluate", "icl", "pool", "score"]
