"""Pool curation rules: the cap, the eviction orders and the label audit."""

from __future__ import annotations

from collections import Counter

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from icd.config import PoolConfig
from icd.method.curation import (
    EVICTED_OLDEST,
    EVICTED_REDUNDANT,
    LABEL_AUDIT,
    Curation,
    curate,
)

LABELS = ("circle", "square", "star", "ring")


@st.composite
def pools(draw: st.DrawFn, max_n: int = 24) -> dict:
    """Live pool rows: unique ids, labels from a few classes, distinct stream positions,
    small integer vectors (so exact duplicates and ties happen)."""
    n = draw(st.integers(0, max_n))
    dim = draw(st.integers(1, 4))
    labels = draw(st.lists(st.sampled_from(LABELS), min_size=n, max_size=n))
    pos = draw(st.lists(st.integers(0, 10_000), min_size=n, max_size=n, unique=True))
    flat = draw(st.lists(st.integers(-3, 3), min_size=n * dim, max_size=n * dim))
    vecs = np.array(flat, dtype=np.float32).reshape(n, dim)
    live = draw(st.lists(st.booleans(), min_size=n, max_size=n)) if draw(st.booleans()) else None
    return {
        "ids": [f"s{p:05d}" for p in pos],
        "labels": labels,
        "image_vecs": vecs,
        "stream_pos": pos,
        "live": live,
    }


def _live_ids(pool: dict) -> list[str]:
    live = pool["live"] or [True] * len(pool["ids"])
    return [i for i, ok in zip(pool["ids"], live, strict=True) if ok]


def _curate(pool: dict, **rules: object) -> Curation:
    return curate(**pool, rules=PoolConfig(**rules))


def _permuted(pool: dict, seed: int) -> dict:
    order = np.random.default_rng(seed).permutation(len(pool["ids"]))
    return {
        "ids": [pool["ids"][i] for i in order],
        "labels": [pool["labels"][i] for i in order],
        "image_vecs": pool["image_vecs"][order],
        "stream_pos": [pool["stream_pos"][i] for i in order],
        "live": None if pool["live"] is None else [pool["live"][i] for i in order],
    }


@settings(max_examples=150, deadline=None)
@given(pools(), st.integers(1, 30), st.sampled_from(["oldest", "redundant"]), st.booleans())
def test_never_more_than_max_rows_left(pool: dict, cap: int, evict: str, audit: bool) -> None:
    out = _curate(pool, max_rows=cap, evict=evict, audit=audit, audit_k=2)
    gone = set(out.reasons)
    live = _live_ids(pool)
    assert gone <= set(live)  # only selectable rows are curated
    assert not set(out.excluded) & set(out.evicted)
    left = len(live) - len(gone)
    assert left <= cap
    # evictions take out exactly the excess, no more
    assert len(out.evicted) == max(0, len(live) - len(out.excluded) - cap)


@settings(max_examples=100, deadline=None)
@given(pools(), st.integers(1, 30))
def test_oldest_evicts_by_stream_position(pool: dict, cap: int) -> None:
    out = _curate(pool, max_rows=cap, evict="oldest")
    live = set(_live_ids(pool))
    by_pos = sorted(zip(pool["stream_pos"], pool["ids"], strict=True))
    order = [i for _, i in by_pos if i in live]
    assert list(out.evicted) == order[: len(out.evicted)]
    assert set(out.reasons.values()) <= {EVICTED_OLDEST}


@settings(max_examples=150, deadline=None)
@given(pools(), st.integers(1, 30))
def test_redundant_keeps_a_labels_only_demo_while_another_label_has_duplicates(
    pool: dict, cap: int
) -> None:
    """Replaying the evictions one at a time: each one takes a row whose label still has
    another row, unless every label is down to one row."""
    out = _curate(pool, max_rows=cap, evict="redundant")
    assert set(out.reasons.values()) <= {EVICTED_REDUNDANT}
    label_of = dict(zip(pool["ids"], pool["labels"], strict=True))
    counts = Counter(label_of[i] for i in _live_ids(pool))
    for sid in out.evicted:
        if max(counts.values()) >= 2:
            assert counts[label_of[sid]] >= 2, (sid, counts)
        counts[label_of[sid]] -= 1
        counts += Counter()  # drop labels with no rows left


def test_redundant_evicts_the_older_of_the_closest_same_label_pair() -> None:
    vecs = np.array([[1, 0], [1, 0.01], [0, 1], [1, 0.5]], dtype=np.float32)
    pool = {
        "ids": ["a", "b", "c", "d"],
        "labels": ["x", "x", "y", "x"],
        "image_vecs": vecs,
        "stream_pos": [5, 1, 3, 0],
        "live": None,
    }
    out = _curate(pool, max_rows=3, evict="redundant")
    assert out.evicted == ("b",)  # a and b are the closest pair; b came first
    assert _curate(pool, max_rows=3, evict="oldest").evicted == ("d",)


@settings(max_examples=150, deadline=None)
@given(pools(), st.integers(1, 4), st.sampled_from([0.0, 0.5, 0.7]), st.integers(0, 2**16))
def test_audit_is_deterministic_and_order_invariant(
    pool: dict, k: int, threshold: float, seed: int
) -> None:
    rules = {"audit": True, "audit_k": k, "audit_threshold": threshold}
    first = _curate(pool, **rules)
    assert _curate(pool, **rules) == first
    assert _curate(_permuted(pool, seed), **rules) == first
    assert set(first.reasons.values()) <= {LABEL_AUDIT}
    assert list(first.excluded) == sorted(first.excluded)


@settings(max_examples=100, deadline=None)
@given(pools(), st.integers(1, 30), st.sampled_from(["oldest", "redundant"]), st.integers(0, 99))
def test_evictions_do_not_depend_on_row_order(pool: dict, cap: int, evict: str, seed: int) -> None:
    first = _curate(pool, max_rows=cap, evict=evict)
    assert _curate(_permuted(pool, seed), max_rows=cap, evict=evict) == first


def test_audit_excludes_a_label_its_neighbours_contradict() -> None:
    rng = np.random.default_rng(0)
    centres = {"circle": [1.0, 0.0, 0.0], "star": [0.0, 1.0, 0.0]}
    ids, labels, vecs = [], [], []
    for label, centre in centres.items():
        for i in range(6):
            ids.append(f"{label}{i}")
            labels.append(label)
            vecs.append(np.array(centre) + 0.05 * rng.standard_normal(3))
    labels[ids.index("star3")] = "circle"  # a wrong label among the stars
    pool = {
        "ids": ids,
        "labels": labels,
        "image_vecs": np.array(vecs, dtype=np.float32),
        "stream_pos": list(range(len(ids))),
        "live": None,
    }
    out = _curate(pool, audit=True, audit_k=4)
    assert out.excluded == ("star3",)
    assert _curate(pool, audit=False) == Curation()


def test_audit_needs_a_full_neighbourhood() -> None:
    pool = {
        "ids": ["a", "b", "c"],
        "labels": ["x", "y", "z"],
        "image_vecs": np.eye(3, dtype=np.float32),
        "stream_pos": [0, 1, 2],
        "live": None,
    }
    assert _curate(pool, audit=True, audit_k=3) == Curation()
    assert set(_curate(pool, audit=True, audit_k=1).excluded) == {"a", "b", "c"}


def test_neighbours_of_many_labels_are_no_evidence() -> None:
    """Each demo's neighbours all disagree with it, but on no one label: none is excluded;
    once three neighbours say the same other label, the demo goes."""
    vecs = np.array([[1, 0.1 * i] for i in range(5)], dtype=np.float32)
    pool = {
        "ids": list("abcde"),
        "labels": ["v", "w", "x", "y", "z"],
        "image_vecs": vecs,
        "stream_pos": list(range(5)),
        "live": None,
    }
    assert _curate(pool, audit=True, audit_k=4) == Curation()
    pool["labels"] = ["v", "w", "w", "w", "z"]
    assert _curate(pool, audit=True, audit_k=4, audit_threshold=0.5).excluded == ("a", "e")


def test_nothing_is_curated_below_the_cap() -> None:
    pool = {
        "ids": ["a", "b"],
        "labels": ["x", "x"],
        "image_vecs": np.ones((2, 2), dtype=np.float32),
        "stream_pos": [0, 1],
        "live": None,
    }
    assert _curate(pool, max_rows=2) == Curation()
    assert _curate(pool) == Curation()


def test_curated_rows_are_evidence_but_never_curated_again() -> None:
    """A row out of selection still counts as a neighbour of the audit: here the wrongly
    labelled circle is contradicted only by stars that were evicted already."""
    vecs = np.array([[1, 0.01 * i] for i in range(5)], dtype=np.float32)
    pool = {
        "ids": list("abcde"),
        "labels": ["circle", "star", "star", "star", "star"],
        "image_vecs": vecs,
        "stream_pos": list(range(5)),
        "live": [True, False, False, False, True],
    }
    out = _curate(pool, audit=True, audit_k=3, max_rows=1)
    assert out.excluded == ("a",) and out.evicted == ()
