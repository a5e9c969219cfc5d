"""Demonstration selection: equal to brute force, per-label cap, ordering, randomness,
degenerate pools."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from icd.config import SelectionConfig
from icd.method.selection import ann_applies, ann_query, select_demos, similarities


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make(
    seed: int, n_pool: int, n_query: int = 4, dim: int = 8, n_labels: int = 5, shared: bool = True
):
    """Random unit vectors; with ``shared`` the pool rows of one label share a label vector."""
    rng = np.random.default_rng(seed)
    labels = [f"label {i}" for i in rng.integers(n_labels, size=n_pool)]
    label_vecs = {
        lab: v
        for lab, v in zip(
            sorted(set(labels)),
            unit(rng.standard_normal((max(1, len(set(labels))), dim))),
            strict=False,
        )
    }
    pool_txt = (
        np.array([label_vecs[lab] for lab in labels], dtype=np.float32).reshape(n_pool, dim)
        if shared
        else unit(rng.standard_normal((n_pool, dim))).reshape(n_pool, dim)
    )
    return dict(
        query_img=unit(rng.standard_normal((n_query, dim))),
        query_txt=unit(rng.standard_normal((n_query, dim))),
        pool_img=unit(rng.standard_normal((n_pool, dim))).reshape(n_pool, dim),
        pool_txt=pool_txt,
        pool_labels=labels,
    )


def brute_force(s: np.ndarray, labels, k: int, cap: int | None, secondary=None) -> list[list[int]]:
    """Full sort of every row (score desc, secondary desc, row asc), then the greedy cap."""
    out = []
    for b in range(s.shape[0]):
        keys = [np.arange(s.shape[1])]
        if secondary is not None:
            keys.append(-secondary[b])
        keys.append(-s[b])
        order = np.lexsort(keys)
        used, picked = {}, []
        for j in order.tolist():
            if cap is not None and used.get(labels[j], 0) >= cap:
                continue
            used[labels[j]] = used.get(labels[j], 0) + 1
            picked.append(j)
            if len(picked) == k:
                break
        out.append(picked)
    return out


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n_pool=st.integers(0, 80),
    k=st.integers(0, 7),
    strategy=st.sampled_from(["rices", "cross_modal"]),
)
def test_rices_and_cross_modal_equal_brute_force_top_k(seed, n_pool, k, strategy):
    d = make(seed, n_pool, shared=False)
    cfg = SelectionConfig(strategy=strategy, k=k, most_similar_last=False)
    got = select_demos(**d, cfg=cfg, seed=0)
    a = d["pool_img"] if strategy == "rices" else d["pool_txt"]
    exact = d["query_img"].astype(np.float64) @ a.T.astype(np.float64)  # independent, float64
    for row, s in zip(got, exact, strict=True):
        want = np.argsort(-s, kind="stable")[: min(k, n_pool)]
        assert set(row.tolist()) == set(want.tolist())
        assert len(row) == min(k, n_pool)
        assert np.all(np.diff(s[row]) <= 1e-6)  # best first


@settings(max_examples=80, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n_pool=st.integers(0, 300),
    k=st.integers(1, 6),
    cap=st.one_of(st.none(), st.integers(1, 3)),
    n_labels=st.integers(1, 8),
    shared=st.booleans(),
    strategy=st.sampled_from(["rices", "cross_modal", "combined"]),
    with_text=st.booleans(),
)
def test_per_label_cap_equals_greedy_brute_force(
    seed, n_pool, k, cap, n_labels, shared, strategy, with_text
):
    d = make(seed, n_pool, n_labels=n_labels, shared=shared)
    if not with_text:
        d["query_txt"] = None
    cfg = SelectionConfig(strategy=strategy, k=k, per_label_cap=cap, most_similar_last=False)
    got = select_demos(**d, cfg=cfg, seed=0)
    if n_pool == 0:
        assert all(len(r) == 0 for r in got)
        return
    s = similarities(d["query_img"], d["query_txt"], d["pool_img"], d["pool_txt"], cfg)
    want = brute_force(s, d["pool_labels"], k, cap)
    assert [r.tolist() for r in got] == want
    for row in got:
        assert len(set(row.tolist())) == len(row)
        if cap is not None:
            counts = np.unique([d["pool_labels"][j] for j in row], return_counts=True)[1]
            assert counts.max(initial=0) <= cap


def test_cap_fallback_when_top_candidates_share_a_label():
    # 600 rows, the 500 best all of one label (shared label vectors tie): the first
    # candidates hold one label only, so the per-label fallback must find the others.
    rng = np.random.default_rng(1)
    dim = 16
    target = unit(rng.standard_normal((1, dim)))
    others = unit(rng.standard_normal((3, dim)) - 3 * target)
    pool_txt = np.concatenate([np.repeat(target, 500, 0), np.repeat(others, [40, 30, 30], 0)])
    labels = ["a"] * 500 + ["b"] * 40 + ["c"] * 30 + ["d"] * 30
    pool_img = unit(rng.standard_normal((600, dim)))
    q = np.repeat(target, 2, 0)
    for strategy in ["cross_modal", "cascade"]:
        cfg = SelectionConfig(
            strategy=strategy, k=3, per_label_cap=1, most_similar_last=False, shortlist=4
        )
        got = select_demos(q, None, pool_img, pool_txt, labels, cfg)
        for row in got:
            assert sorted(labels[j] for j in row)[0] == "a" and len({labels[j] for j in row}) == 3


def cascade_reference(d, cfg):
    qi, qt, pi, pt, labels = (
        d["query_img"],
        d["query_txt"],
        d["pool_img"],
        d["pool_txt"],
        d["pool_labels"],
    )
    it, ii = qi @ pt.T, qi @ pi.T
    shortlists = brute_force(it, labels, max(cfg.shortlist, cfg.k), cfg.per_label_cap, secondary=ii)
    out = []
    for b, rows in enumerate(shortlists):
        rows = np.array(rows, dtype=np.int64)
        rows = rows[np.lexsort((rows, -ii[b, rows]))][: 2 * cfg.k]
        if qt is not None and len(rows):
            rows = rows[np.lexsort((rows, -(pt[rows] @ qt[b])))]
        rows = rows[: cfg.k]
        out.append((rows[::-1] if cfg.most_similar_last else rows).tolist())
    return out


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n_pool=st.integers(0, 200),
    k=st.integers(1, 5),
    shortlist=st.integers(1, 24),
    cap=st.one_of(st.none(), st.integers(1, 2)),
    with_text=st.booleans(),
    last=st.booleans(),
)
def test_cascade_matches_its_definition(seed, n_pool, k, shortlist, cap, with_text, last):
    d = make(seed, n_pool, n_labels=6, shared=True)
    if not with_text:
        d["query_txt"] = None
    cfg = SelectionConfig(
        strategy="cascade", k=k, shortlist=shortlist, per_label_cap=cap, most_similar_last=last
    )
    got = [r.tolist() for r in select_demos(**d, cfg=cfg, seed=0)]
    if n_pool == 0:
        assert got == [[]] * 4
        return
    assert got == cascade_reference(d, cfg)


def test_cascade_uses_every_stage():
    # Pool rows 0-3: labels A,A,B,B. The query image is near label B's text, so stage 1
    # shortlists {2, 3}; image→image prefers 3; text→text (the student said "A-ish") reorders.
    e = np.eye(4, dtype=np.float32)
    pool_txt = np.stack([e[0], e[0], e[1], e[1]])
    pool_img = unit(np.stack([e[2], e[2], e[2] + e[3] * 0.2, e[2] + e[3]]))
    q_img = unit((e[1] + e[3] * 1.5)[None])
    cfg = SelectionConfig(strategy="cascade", k=1, shortlist=2, most_similar_last=False)
    assert select_demos(q_img, None, pool_img, pool_txt, list("AABB"), cfg)[0].tolist() == [3]
    # Stage 3 with k=1 sees the best 2k=2 rows of stage 2; both are label B, text ties → row 2.
    q_txt = unit((e[1])[None])
    assert select_demos(q_img, q_txt, pool_img, pool_txt, list("AABB"), cfg)[0].tolist() == [2]


def test_combined_weights_and_missing_text():
    d = make(3, 50, shared=False)
    cfg = SelectionConfig(strategy="combined", w_ii=1.0, w_it=0.5, w_tt=2.0)
    s = similarities(d["query_img"], d["query_txt"], d["pool_img"], d["pool_txt"], cfg)
    want = (
        d["query_img"] @ d["pool_img"].T
        + 0.5 * d["query_img"] @ d["pool_txt"].T
        + 2.0 * d["query_txt"] @ d["pool_txt"].T
    )
    assert np.allclose(s, want, atol=1e-5)
    no_text = select_demos(**{**d, "query_txt": None}, cfg=cfg)
    no_tt = select_demos(**{**d, "query_txt": None}, cfg=cfg.model_copy(update={"w_tt": 0.0}))
    assert [r.tolist() for r in no_text] == [r.tolist() for r in no_tt]
    rices = select_demos(**d, cfg=SelectionConfig(strategy="rices"))
    combined_ii = select_demos(**d, cfg=cfg.model_copy(update={"w_it": 0.0, "w_tt": 0.0}))
    assert [r.tolist() for r in rices] == [r.tolist() for r in combined_ii]


def test_order_most_similar_last():
    d = make(5, 40, shared=False)
    last = select_demos(**d, cfg=SelectionConfig(strategy="rices", k=4, most_similar_last=True))
    first = select_demos(**d, cfg=SelectionConfig(strategy="rices", k=4, most_similar_last=False))
    for a, b, q in zip(last, first, d["query_img"], strict=True):
        assert a.tolist() == b[::-1].tolist()
        sims = d["pool_img"][a] @ q
        assert np.all(np.diff(sims) >= 0)  # ascending: the best is nearest the query


def test_random_is_seeded_per_query_and_independent_of_the_batch():
    d = make(7, 500, n_query=6)
    ids = [f"q{i}" for i in range(6)]
    cfg = SelectionConfig(strategy="random", k=4)
    full = select_demos(**d, cfg=cfg, seed=11, query_ids=ids)
    again = select_demos(**d, cfg=cfg, seed=11, query_ids=ids)
    sub = {k: (v[[4, 1]] if k in ("query_img", "query_txt") else v) for k, v in d.items()}
    part = select_demos(**sub, cfg=cfg, seed=11, query_ids=[ids[4], ids[1]])
    other_seed = select_demos(**d, cfg=cfg, seed=12, query_ids=ids)
    assert [r.tolist() for r in full] == [r.tolist() for r in again]
    assert part[0].tolist() == full[4].tolist() and part[1].tolist() == full[1].tolist()
    assert [r.tolist() for r in full] != [r.tolist() for r in other_seed]
    assert all(len(set(r.tolist())) == 4 for r in full)
    assert len({tuple(r.tolist()) for r in full}) > 1
    capped = select_demos(
        **d, cfg=cfg.model_copy(update={"per_label_cap": 1}), seed=11, query_ids=ids
    )
    for row in capped:
        assert len({d["pool_labels"][j] for j in row}) == len(row) == 4


@pytest.mark.parametrize("strategy", ["random", "rices", "cross_modal", "combined", "cascade"])
def test_small_and_empty_pools(strategy):
    cfg = SelectionConfig(strategy=strategy, k=5)
    d = make(2, 3)
    got = select_demos(**d, cfg=cfg, query_ids=["a", "b", "c", "d"])
    assert all(sorted(r.tolist()) == [0, 1, 2] for r in got)
    empty = make(2, 0)
    got = select_demos(**empty, cfg=cfg)
    assert len(got) == 4 and all(r.dtype == np.int64 and len(r) == 0 for r in got)
    assert all(len(r) == 0 for r in select_demos(**d, cfg=cfg.model_copy(update={"k": 0})))
    capped = select_demos(
        **make(2, 30, n_labels=2), cfg=cfg.model_copy(update={"per_label_cap": 1})
    )
    assert all(len(r) == 2 for r in capped)


def test_shape_errors():
    d = make(1, 10)
    with pytest.raises(ValueError, match="same number of rows"):
        select_demos(**{**d, "pool_labels": d["pool_labels"][:5]}, cfg=SelectionConfig())
    with pytest.raises(ValueError, match="dimension"):
        select_demos(**{**d, "pool_img": np.zeros((10, 3), np.float32)}, cfg=SelectionConfig())
    with pytest.raises(ValueError, match="one id per query"):
        select_demos(**d, cfg=SelectionConfig(), query_ids=["x"])


# --- ranking an index's shortlist (candidates) ---


@pytest.mark.parametrize("strategy", ["rices", "combined", "cascade"])
@pytest.mark.parametrize("cap", [None, 1])
def test_candidates_holding_the_whole_pool_give_the_exact_demos(strategy, cap) -> None:
    for seed in range(5):
        d = make(seed, n_pool=60, n_query=6)
        cfg = SelectionConfig(strategy=strategy, k=3, per_label_cap=cap, shortlist=8)
        want = select_demos(**d, cfg=cfg)
        rng = np.random.default_rng(seed)
        cand = [rng.permutation(60) for _ in range(6)]  # order and duplicates do not matter
        cand[0] = np.concatenate([cand[0], cand[0][:5]])
        got = select_demos(**d, cfg=cfg, candidates=cand)
        assert all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))


def test_candidates_restrict_each_query_to_its_rows() -> None:
    d = make(7, n_pool=80, n_query=4, n_labels=20)
    cfg = SelectionConfig(strategy="combined", k=3)
    rng = np.random.default_rng(0)
    cand = [np.sort(rng.choice(80, size=12, replace=False)) for _ in range(4)]
    got = select_demos(**d, cfg=cfg, candidates=cand)
    for b, rows in enumerate(cand):
        sub = {key: d[key] for key in ("query_img", "query_txt")}
        one = select_demos(
            sub["query_img"][b : b + 1], sub["query_txt"][b : b + 1], d["pool_img"][rows],
            d["pool_txt"][rows], [d["pool_labels"][j] for j in rows], cfg,
        )[0]  # fmt: skip
        assert np.array_equal(got[b], rows[one])
    # A shortlist that cannot fill k slots is replaced by the whole pool's ranking.
    few = select_demos(**d, cfg=cfg, candidates=[np.array([5])] * 4)
    assert all(np.array_equal(f, w) for f, w in zip(few, select_demos(**d, cfg=cfg), strict=True))
    with pytest.raises(ValueError, match="candidates"):
        select_demos(**d, cfg=cfg, candidates=cand[:2])


@pytest.mark.parametrize("strategy", ["rices", "combined"])
def test_ann_query_inner_products_are_the_strategy_scores(strategy) -> None:
    d = make(3, n_pool=30, n_query=5)
    cfg = SelectionConfig(strategy=strategy)
    joint = np.hstack([d["pool_img"], d["pool_txt"]])
    q = ann_query(d["query_img"], d["query_txt"], cfg)
    want = similarities(d["query_img"], d["query_txt"], d["pool_img"], d["pool_txt"], cfg)
    np.testing.assert_allclose(q @ joint.T, want, atol=1e-5)
    assert ann_applies(cfg) and not ann_applies(SelectionConfig(strategy="random"))
    with pytest.raises(ValueError):
        ann_query(d["query_img"], None, SelectionConfig(strategy="random"))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n_pool=st.integers(1, 30), k=st.integers(1, 4))
def test_the_least_similar_ablation_shows_the_lowest_scoring_rows(seed, n_pool, k):
    """Retrieval broken on purpose: the demos are those a brute force picks on the negated
    score, i.e. the least similar rows, still ordered with the best-ranked nearest the query."""
    d = make(seed, n_pool)
    for strategy in ("rices", "cross_modal", "combined"):
        cfg = SelectionConfig(strategy=strategy, k=k, least_similar=True, most_similar_last=False)
        s = similarities(d["query_img"], d["query_txt"], d["pool_img"], d["pool_txt"], cfg)
        got = [r.tolist() for r in select_demos(cfg=cfg, **d)]
        assert got == brute_force(-s, d["pool_labels"], k, None)
        normal = select_demos(cfg=cfg.model_copy(update={"least_similar": False}), **d)
        if strategy == "rices" and n_pool > 2 * k:  # distinct scores: disjoint with room
            assert all(not set(a) & set(b.tolist()) for a, b in zip(got, normal, strict=True))
