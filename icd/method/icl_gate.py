"""Selective ICL: which samples get the student's second, in-context pass
(docs/design.md §10).

ICD's cost is that second pass: every sample the teacher did not answer is answered again
with k demonstration images in the prompt. With ``icl_gate.mode: uncertain`` a candidate
(a sample that would get the pass) whose zero-shot uncertainty is low keeps its zero-shot
answer instead. The gate is the query policy's rule (:func:`icd.method.policy.decide_queries`)
applied to the candidates in stream order, with its own state:

- ``fixed``: ICL iff the uncertainty is above ``tau``;
- ``adaptive``: ICL for about ``icl_rate`` of the candidates — the most uncertain ones, by a
  running quantile, paced so the rate holds along the stream — and never more than
  ``floor(icl_rate · candidates seen)`` (the policy's running cap).

A candidate without a finite uncertainty (the student failed) always gets the pass and is
not shown to the gate. So decisions depend only on the candidates' uncertainties in order:
any chunking gives the same, and a run resumed from a saved :class:`PolicyState` decides as
an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from icd.config import IclGateConfig, PolicyConfig
from icd.method.policy import PolicyState, decide_queries


def gate_policy(gate: IclGateConfig) -> PolicyConfig:
    """The query-policy config that decides "this candidate gets ICL" for ``gate``."""
    if gate.threshold == "fixed":
        return PolicyConfig(
            threshold="fixed", tau=gate.tau, budget=None, budget_count=None, warmup=0
        )
    return PolicyConfig(
        threshold="adaptive", tau=gate.tau, budget=gate.icl_rate, budget_count=None, warmup=0
    )


def gate_icl(
    candidates: Sequence[int],
    uncertainties: np.ndarray | None,
    *,
    state: PolicyState,
    gate: IclGateConfig,
) -> tuple[list[int], list[int], PolicyState]:
    """Split ``candidates`` (row indices into ``uncertainties``, in stream order) into those
    that get the ICL pass and those that keep their zero-shot answer; return both and the
    gate's new state (``state`` itself is not changed). ``always`` passes every candidate."""
    if gate.mode == "always" or uncertainties is None:
        return list(candidates), [], state
    u = np.asarray(uncertainties, dtype=np.float64)
    judged = [i for i in candidates if np.isfinite(u[i])]
    mask, state = decide_queries(u[judged], state, gate_policy(gate))
    skipped = {i for i, icl in zip(judged, mask.tolist(), strict=True) if not icl}
    return [i for i in candidates if i not in skipped], sorted(skipped), state
