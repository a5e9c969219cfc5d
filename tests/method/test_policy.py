"""Query policy: the budget is never exceeded, decisions do not depend on chunking or on a
save/restore of the state, and the adaptive threshold paces the budget over the stream."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from icd.config import PolicyConfig
from icd.method.policy import PolicyState, budget_cap, decide_queries, total_budget


def run_chunked(u, cfg, length, cuts, roundtrip=True):
    """Feed ``u`` in chunks cut at ``cuts``, optionally through JSON between chunks."""
    state, out = PolicyState(), []
    bounds = [0, *sorted(set(c for c in cuts if 0 < c < len(u))), len(u)]
    for a, b in zip(bounds, bounds[1:], strict=False):
        mask, state = decide_queries(u[a:b], state, cfg, length)
        out.append(mask)
        if roundtrip:
            state = PolicyState.from_dict(json.loads(json.dumps(state.to_dict())))
    return (np.concatenate(out) if out else np.zeros(0, bool)), state


def expected_cap(cfg: PolicyConfig, seen: int, length: int | None) -> float:
    """The budget, computed independently: count, else floor(ρ·L), else floor(ρ·seen)."""
    if cfg.budget_count is not None:
        return cfg.budget_count
    if cfg.budget is None:
        return math.inf
    rho = Fraction(str(cfg.budget))
    return math.floor(rho * (length if length is not None else seen))


@st.composite
def policies(draw):
    threshold = draw(st.sampled_from(["adaptive", "fixed", "always", "never"]))
    budget = draw(st.one_of(st.none(), st.floats(0.0, 0.6).map(lambda x: round(x, 3))))
    count = draw(st.one_of(st.none(), st.integers(0, 40)))
    if threshold == "adaptive" and budget is None:
        budget = 0.1
    return PolicyConfig(
        threshold=threshold,
        budget=budget,
        budget_count=count,
        warmup=draw(st.integers(0, 20)),
        tau=draw(st.floats(0.0, 1.0)),
    )


streams = st.lists(st.floats(0.0, 1.0), max_size=250).map(lambda xs: np.array(xs, dtype=float))


@settings(max_examples=150, deadline=None)
@given(
    u=streams,
    cfg=policies(),
    length_kind=st.sampled_from(["none", "exact", "longer"]),
    cuts=st.lists(st.integers(0, 250), max_size=8),
)
def test_budget_never_exceeded_and_chunking_invariant(u, cfg, length_kind, cuts):
    length = {"none": None, "exact": len(u), "longer": len(u) + 37}[length_kind]
    whole, state_whole = decide_queries(u, PolicyState(), cfg, length)
    chunked, state_chunked = run_chunked(u, cfg, length, cuts)
    ones, _ = run_chunked(u, cfg, length, range(len(u)), roundtrip=False)

    # Same decisions whatever the chunking, with or without a JSON round trip.
    assert whole.tolist() == chunked.tolist() == ones.tolist()
    assert state_whole.to_dict() == state_chunked.to_dict()
    assert state_whole.queried == int(whole.sum()) and state_whole.seen == len(u)
    # The budget holds after every sample.
    prefix = np.cumsum(whole)
    for seen, used in enumerate(prefix, start=1):
        assert used <= expected_cap(cfg, seen, length)
        assert used <= (budget_cap(cfg, seen, length) or math.inf)
    if cfg.threshold == "never":
        assert not whole.any()


@settings(max_examples=40, deadline=None)
@given(
    u=streams,
    cfg=policies(),
    split=st.integers(0, 250),
    more=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=100),
)
def test_restored_state_makes_identical_future_decisions(u, cfg, split, more):
    head, _ = decide_queries(u, PolicyState(), cfg, None)
    _, state = decide_queries(u, PolicyState(), cfg, None)
    restored = PolicyState.from_dict(json.loads(json.dumps(state.to_dict())))
    assert restored == state
    tail = np.array(more)
    a, sa = decide_queries(tail, state, cfg, None)
    b, sb = decide_queries(tail, restored, cfg, None)
    assert a.tolist() == b.tolist() and sa == sb
    both, _ = decide_queries(np.concatenate([u, tail]), PolicyState(), cfg, None)
    assert both.tolist() == head.tolist() + a.tolist()


@pytest.mark.parametrize("rho", [0.04, 0.15])
@pytest.mark.parametrize("known_length", [True, False])
@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), dist=st.sampled_from(["uniform", "exponential", "beta"]))
def test_adaptive_rate_tracks_rho(rho, known_length, seed, dist):
    rng = np.random.default_rng(seed)
    n, warmup = 10_000, 8
    u = {
        "uniform": lambda: rng.random(n),
        "exponential": lambda: rng.exponential(size=n),
        "beta": lambda: rng.beta(0.5, 3.0, size=n),
    }[dist]()
    cfg = PolicyConfig(threshold="adaptive", budget=rho, warmup=warmup)
    q, state = decide_queries(u, PolicyState(), cfg, n if known_length else None)
    assert abs(q[warmup:].mean() - rho) <= 0.01
    assert q.sum() <= math.floor(Fraction(str(rho)) * n)
    # Spread over the stream, not front-loaded: every quarter is near ρ too.
    for quarter in np.split(q, 4):
        assert abs(quarter.mean() - rho) <= 0.01
    # It is the uncertain samples that get queried.
    assert u[q].mean() > u[~q].mean()


def test_warmup_is_queried_and_counts_against_the_budget():
    cfg = PolicyConfig(threshold="fixed", tau=10.0, budget=0.1, warmup=5)
    q, state = decide_queries(np.zeros(100), PolicyState(), cfg, 100)
    assert q[:5].all() and not q[5:].any() and state.queried == 5
    tight = PolicyConfig(threshold="fixed", tau=10.0, budget_count=3, warmup=5)
    q, _ = decide_queries(np.zeros(100), PolicyState(), tight, None)
    assert q.tolist() == [True] * 3 + [False] * 97


def test_fixed_threshold_until_the_budget_runs_out():
    cfg = PolicyConfig(threshold="fixed", tau=0.5, budget_count=3, warmup=0)
    u = np.array([0.9, 0.1, 0.6, 0.5, 0.7, 0.8, 0.99])
    q, _ = decide_queries(u, PolicyState(), cfg, None)
    assert q.tolist() == [True, False, True, False, True, False, False]


def test_always_and_never():
    always = PolicyConfig(threshold="always", budget=0.25, warmup=0)
    q, _ = decide_queries(np.zeros(12), PolicyState(), always, None)  # running cap floor(n/4)
    assert np.flatnonzero(q).tolist() == [3, 7, 11]
    unlimited = PolicyConfig(threshold="always", budget=None)
    assert decide_queries(np.zeros(5), PolicyState(), unlimited, None)[0].all()
    never = PolicyConfig(threshold="never", budget=1.0, warmup=4)
    assert not decide_queries(np.ones(10), PolicyState(), never, 10)[0].any()


def test_constant_uncertainty_is_still_sampled_at_rate_rho():
    cfg = PolicyConfig(threshold="adaptive", budget=0.1, warmup=0)
    q, _ = decide_queries(np.ones(1000), PolicyState(), cfg, None)
    assert q.sum() == 100


def test_budget_as_written_decimal():
    cfg = PolicyConfig(budget=0.29)
    assert 0.29 * 100 < 29  # the float product would floor to 28
    assert total_budget(cfg, 100) == 29
    assert budget_cap(PolicyConfig(budget=0.29), 100, None) == 29
    assert total_budget(PolicyConfig(budget=0.5, budget_count=7), 100) == 7
    assert total_budget(PolicyConfig(budget=None), 100) is None


def test_adaptive_budget_count_paces_over_known_length():
    cfg = PolicyConfig(threshold="adaptive", budget=None, budget_count=200, warmup=0)
    rng = np.random.default_rng(0)
    q, _ = decide_queries(rng.random(4000), PolicyState(), cfg, 4000)
    assert q.sum() <= 200 and q[:2000].sum() == pytest.approx(100, abs=15)


def test_errors_and_state_checks():
    with pytest.raises(ValueError, match="finite"):
        decide_queries(np.array([np.nan]), PolicyState(), PolicyConfig(), None)
    with pytest.raises(ValueError, match="adaptive"):
        decide_queries(np.zeros(3), PolicyState(), PolicyConfig(budget=None), None)
    with pytest.raises(ValueError):
        PolicyState.from_dict({"seen": 1, "queried": 2, "history": []})
    with pytest.raises(ValueError):
        PolicyState.from_dict({"seen": 1})
    state = PolicyState()
    decide_queries(np.ones(5), state, PolicyConfig(), 5)
    assert state == PolicyState()  # input state untouched
