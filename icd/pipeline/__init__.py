"""The stream flow's machinery: the run's facts, one chunk's work and the resume state
(:mod:`.context`), how tasks run (:mod:`.runner`), and the stages as Prefect tasks with their
cache keys (:mod:`.stages`). The flow itself, whose body is the stage diagram, is
:mod:`icd.flows.stream`."""
