"""Uncertainty measures: pinned against hand-computed values, batched = one by one."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from icd.method.types import Generation
from icd.method.uncertainty import EMPTY_UNCERTAINTY, MAX_STAT, MEASURES, pad, uncertainty


def gen(logprobs, entropies, top2=(1.0, 0.0), text="x") -> Generation:
    return Generation(text, np.asarray(logprobs, float), np.asarray(entropies, float), top2)


def entropy(p: list[float]) -> float:
    return -sum(x * math.log(x) for x in p if x > 0)


# Two answer tokens: step 1 has distribution (0.5, 0.25, 0.25) and the model picked the 0.5
# token; step 2 is uniform over 4 tokens and it picked one of them.
H1 = 1.5 * math.log(2)  # entropy(0.5, .25, .25) = 1.0397 nats
H2 = math.log(4)  # 1.3863 nats
TWO_TOKENS = gen([math.log(0.5), math.log(0.25)], [H1, H2], top2=(0.5, 0.25))


def test_hand_computed_values():
    assert entropy([0.5, 0.25, 0.25]) == pytest.approx(H1)
    g = TWO_TOKENS
    assert uncertainty([g], "entropy_mean")[0] == pytest.approx((1.0397208 + 1.3862944) / 2)
    assert uncertainty([g], "nll_mean")[0] == pytest.approx((0.6931472 + 1.3862944) / 2)
    assert uncertainty([g], "entropy_first")[0] == pytest.approx(1.0397208)
    assert uncertainty([g], "margin")[0] == pytest.approx(1 - (0.5 - 0.25))


def test_confident_answer_is_less_uncertain_in_every_measure():
    sure = gen([math.log(0.99)], [entropy([0.99, 0.01])], top2=(0.99, 0.01))
    for m in MEASURES:
        a, b = uncertainty([sure, TWO_TOKENS], m)
        assert a < b, m


def test_padding_does_not_leak_between_rows():
    long = gen([-0.1, -0.2, -0.3, -0.4], [0.4, 0.3, 0.2, 0.1])
    short = gen([-1.0], [2.0])
    got = uncertainty([long, short, long], "entropy_mean")
    assert got == pytest.approx([0.25, 2.0, 0.25])
    got = uncertainty([short, long], "nll_mean")
    assert got == pytest.approx([1.0, 0.25])


def test_empty_answers_are_maximally_uncertain():
    ended_at_once = gen([], [], text="")  # end-of-sequence first: no answer tokens
    blank = gen([math.log(0.99), -0.01], [0.05, 0.01], top2=(0.99, 0.01), text=" \n")
    sure = gen([math.log(0.99)], [entropy([0.99, 0.01])], top2=(0.99, 0.01))
    assert {**dict.fromkeys(MEASURES, MAX_STAT), "margin": 1.0} == EMPTY_UNCERTAINTY
    for m in MEASURES:
        got = uncertainty([ended_at_once, sure, blank, TWO_TOKENS], m)
        assert got[0] == got[2] == EMPTY_UNCERTAINTY[m], m
        assert got[0] > max(got[1], got[3]), m  # above any real answer: the teacher is asked
        assert uncertainty([], m).shape == (0,)


def test_non_finite_statistics_stay_finite():
    bad = gen([-np.inf, np.nan], [np.nan, np.inf], top2=(np.nan, 0.0))
    for m in MEASURES:
        u = uncertainty([bad], m)
        assert np.all(np.isfinite(u)) and np.all(u >= 0), m


def test_unknown_measure():
    with pytest.raises(ValueError, match="unknown uncertainty measure"):
        uncertainty([TWO_TOKENS], "variance")


def test_pad_mask():
    values, mask = pad([np.array([1.0, 2.0]), np.array([]), np.array([3.0])])
    assert values.tolist() == [[1.0, 2.0], [0.0, 0.0], [3.0, 0.0]]
    assert mask.tolist() == [[True, True], [False, False], [True, False]]


token = st.floats(0.0, 20.0)
answer = st.lists(token, max_size=12).map(
    lambda xs: gen([-x for x in xs], [x / 2 for x in xs], top2=(0.6, 0.3) if xs else (1.0, 0.0))
)


@settings(max_examples=60, deadline=None)
@given(st.lists(answer, max_size=8), st.sampled_from(MEASURES))
def test_batched_equals_one_by_one(gens, measure):
    batch = uncertainty(gens, measure)
    single = [uncertainty([g], measure)[0] for g in gens]
    assert batch.shape == (len(gens),)
    assert np.allclose(batch, single)
    assert np.all(np.isfinite(batch)) and np.all(batch >= 0)
    for g, u in zip(gens, batch, strict=True):
        n = len(g.token_entropy)
        if measure == "entropy_mean":
            assert u == pytest.approx(np.mean(g.token_entropy) if n else 0.0)
        if measure == "nll_mean":
            assert u == pytest.approx(-np.mean(g.token_logprobs) if n else 0.0)
