"""The selective-ICL gate: its decisions do not depend on chunking or on a save/restore of
its state, the fixed threshold orders samples by uncertainty, the adaptive one never gives
ICL to more than its share and tracks it, and ``always`` gates nothing."""

from __future__ import annotations

import json
import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from icd.config import IclGateConfig, MethodConfig
from icd.method.icl_gate import gate_icl
from icd.method.modes import plan
from icd.method.policy import PolicyState

uncertainties = st.lists(
    st.one_of(st.floats(0.0, 3.0, allow_nan=False), st.just(float("nan"))), min_size=1, max_size=120
)
gates = st.one_of(
    st.builds(IclGateConfig, mode=st.just("uncertain"), threshold=st.just("fixed"),
              tau=st.floats(0.0, 3.0)),
    st.builds(IclGateConfig, mode=st.just("uncertain"), threshold=st.just("adaptive"),
              icl_rate=st.floats(0.0, 1.0)),
)  # fmt: skip


def gate_chunked(u: np.ndarray, gate: IclGateConfig, cuts: list[int], candidates=None):
    """Gate ``u`` (every row a candidate unless given) in chunks cut at ``cuts``, the state
    through JSON between chunks as a resumed run reads it; the rows that got ICL."""
    rows = list(range(len(u))) if candidates is None else candidates
    bounds = [0, *sorted({c for c in cuts if 0 < c < len(u)}), len(u)]
    state, icl = PolicyState(), []
    for a, b in zip(bounds, bounds[1:], strict=False):
        chunk = [i - a for i in rows if a <= i < b]
        kept, skipped, state = gate_icl(chunk, u[a:b], state=state, gate=gate)
        assert sorted(kept + skipped) == chunk
        icl += [i + a for i in kept]
        state = PolicyState.from_dict(json.loads(json.dumps(state.to_dict())))
    return icl


@settings(max_examples=150, deadline=None)
@given(uncertainties, gates, st.lists(st.integers(0, 120), max_size=6), st.integers(0, 2**16))
def test_decisions_do_not_depend_on_chunking_or_resume(values, gate, cuts, seed) -> None:
    u = np.array(values)
    rng = np.random.default_rng(seed)
    candidates = sorted(rng.choice(len(u), size=rng.integers(0, len(u) + 1), replace=False))
    whole = gate_chunked(u, gate, [], [int(i) for i in candidates])
    assert gate_chunked(u, gate, cuts, [int(i) for i in candidates]) == whole
    # a sample the student could not answer (no finite uncertainty) always gets ICL
    assert {int(i) for i in candidates if not math.isfinite(u[i])} <= set(whole)


@settings(max_examples=100, deadline=None)
@given(uncertainties, st.floats(0.0, 3.0))
def test_the_fixed_threshold_gives_icl_to_the_uncertain_ones_only(values, tau) -> None:
    u = np.array(values)
    icl = set(gate_chunked(u, IclGateConfig(mode="uncertain", threshold="fixed", tau=tau), []))
    for i, x in enumerate(values):
        assert (i in icl) == (not math.isfinite(x) or x > tau)


@settings(max_examples=100, deadline=None)
@given(uncertainties, st.floats(0.0, 1.0), st.lists(st.integers(0, 120), max_size=6))
def test_the_adaptive_gate_never_exceeds_its_share(values, rate, cuts) -> None:
    u = np.nan_to_num(np.array(values), nan=1.0)
    gate = IclGateConfig(mode="uncertain", threshold="adaptive", icl_rate=rate)
    icl = set(gate_chunked(u, gate, cuts))
    for seen in range(1, len(u) + 1):  # the running cap holds at every point of the stream
        assert sum(i < seen for i in icl) <= math.floor(rate * seen + 1e-9)


def test_the_adaptive_gate_tracks_its_rate_and_passes_the_uncertain_ones() -> None:
    rng = np.random.default_rng(0)
    u = rng.gamma(2.0, 0.5, size=4000)
    gate = IclGateConfig(mode="uncertain", threshold="adaptive", icl_rate=0.3)
    icl = gate_chunked(u, gate, list(range(0, 4000, 64)))
    assert 0.27 <= len(icl) / len(u) <= 0.3
    passed, kept = u[icl], np.delete(u, icl)
    assert np.median(passed) > np.quantile(kept, 0.9)  # the uncertain ones get ICL


def test_always_gates_nothing_and_the_plan_only_gates_student_passes() -> None:
    u = np.linspace(0, 1, 50)
    kept, skipped, state = gate_icl(list(range(50)), u, state=PolicyState(), gate=IclGateConfig())
    assert kept == list(range(50)) and skipped == [] and state == PolicyState()
    uncertain = {"icl_gate": {"mode": "uncertain"}}
    assert plan(MethodConfig()).icl_gate is None
    assert plan(MethodConfig(mode="icd", **uncertain)).icl_gate is not None
    assert plan(MethodConfig(mode="pool_vote", **uncertain)).icl_gate is None  # no student pass
    assert plan(MethodConfig(mode="teacher_forward", **uncertain)).icl_gate is None
