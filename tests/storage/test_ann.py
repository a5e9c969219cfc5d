"""Approximate demo selection (icd.storage.pool.ann): when it engages, recall against exact
selection on clustered vectors, determinism, and rows appended after the index was built."""

from __future__ import annotations

import numpy as np
import pytest

from icd.config import SelectionConfig
from icd.method.selection import select_demos
from icd.storage.pool import ann
from icd.storage.pool.index import PoolView, RunCache

DIM = 32


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(seed: int, n: int, n_clusters: int = 40) -> dict[str, np.ndarray]:
    """Rows scattered around cluster centres; each cluster one label sharing a text vector."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((n_clusters, DIM)))
    label_txt = unit(rng.standard_normal((n_clusters, DIM)))
    cl = rng.integers(0, n_clusters, n)
    img = unit(centres[cl] + 0.1 * rng.standard_normal((n, DIM)))
    qcl = rng.integers(0, n_clusters, 32)
    return {
        "ids": np.array([f"s{i:06d}" for i in range(n)], dtype=object),
        "labels": np.array([f"class {c}" for c in cl], dtype=object),
        "chunk": np.arange(n) // 64,
        "stream_pos": np.arange(n),
        "image_vecs": img,
        "label_vecs": label_txt[cl].astype(np.float32),
        "q_img": unit(centres[qcl] + 0.1 * rng.standard_normal((32, DIM))),
        "q_txt": label_txt[qcl].astype(np.float32),
    }


def cache_of(data: dict[str, np.ndarray], lo: int, hi: int, cache: RunCache | None = None):
    cache = cache or RunCache(DIM)
    cols = ("ids", "labels", "chunk", "stream_pos", "image_vecs", "label_vecs")
    cache.add({c: data[c][lo:hi] for c in cols})
    return cache


def pick(view: PoolView, data, cfg: SelectionConfig, registry: ann.IndexRegistry):
    cand = ann.candidates(view, data["q_img"], data["q_txt"], cfg, registry=registry)
    assert cand is not None
    got = select_demos(
        data["q_img"], data["q_txt"], view.image_vecs, view.label_vecs, view.labels, cfg,
        candidates=cand,
    )  # fmt: skip
    return cand, got


def exact(view: PoolView, data, cfg: SelectionConfig):
    return select_demos(
        data["q_img"], data["q_txt"], view.image_vecs, view.label_vecs, view.labels, cfg
    )


def test_exact_below_the_threshold_and_for_other_strategies() -> None:
    data = clustered(0, 300)
    view = cache_of(data, 0, 300).view(None)
    q = data["q_img"]
    on = SelectionConfig(strategy="combined", ann_min_rows=300)
    assert ann.candidates(view, q, None, on) is not None
    for cfg in (
        SelectionConfig(strategy="combined", ann_min_rows=301),  # below the threshold
        SelectionConfig(strategy="combined", ann_min_rows=None),
        SelectionConfig(strategy="combined", ann_min_rows=0),
        SelectionConfig(strategy="random", ann_min_rows=1),
        SelectionConfig(strategy="cross_modal", ann_min_rows=1),
        SelectionConfig(strategy="cascade", ann_min_rows=1, per_label_cap=1),
        SelectionConfig(strategy="rices", ann_min_rows=1, k=0),
    ):
        assert ann.candidates(view, q, None, cfg) is None, cfg
    # The default keeps every pool of this size exact.
    assert ann.candidates(view, q, None, SelectionConfig(strategy="rices")) is None


@pytest.mark.parametrize("strategy", ["rices", "combined", "cascade"])
def test_recall_on_clustered_vectors(strategy: str) -> None:
    data = clustered(1, 6000)
    view = cache_of(data, 0, 6000).view(None)
    cfg = SelectionConfig(strategy=strategy, k=4, ann_min_rows=1000, ann_nprobe=8)
    cand, got = pick(view, data, cfg, ann.IndexRegistry())
    want = exact(view, data, cfg)
    recall = np.mean([len(set(g) & set(w)) / len(w) for g, w in zip(got, want, strict=True)])
    assert recall >= 0.95
    # The index shortlists, it does not scan: a small share of the pool per query.
    assert max(len(c) for c in cand) < len(view) // 10


def test_same_demos_whether_the_index_was_grown_or_built_at_once() -> None:
    data = clustered(2, 3000)
    cfg = SelectionConfig(strategy="combined", k=3, ann_min_rows=500, ann_nprobe=2)
    grown, reg_grown = RunCache(DIM, capacity=4096), ann.IndexRegistry()
    for lo in range(0, 3000, 250):  # chunk commits, each followed by a selection
        cache_of(data, lo, lo + 250, grown)
        view = grown.view(None)
        ann.candidates(view, data["q_img"], data["q_txt"], cfg, registry=reg_grown)
    index = reg_grown.get(grown.view(None), cfg)
    assert index.rows == 3000 and index.trained_on == 2000  # one buffer: appended, not rebuilt
    once = cache_of(data, 0, 3000)  # a resumed process: one load, one build
    for before in (20, 47):  # views of earlier chunks, after the index holds later rows
        c1, g1 = pick(grown.view(before), data, cfg, reg_grown)
        c2, g2 = pick(once.view(before), data, cfg, ann.IndexRegistry())
        assert all(np.array_equal(a, b) for a, b in zip(c1, c2, strict=True))
        assert all(np.array_equal(a, b) for a, b in zip(g1, g2, strict=True))


def test_rows_appended_after_the_build_are_searched_and_later_rows_are_not() -> None:
    data = clustered(3, 2000)
    cache = cache_of(data, 0, 1500)
    registry = ann.IndexRegistry()
    cfg = SelectionConfig(strategy="rices", k=2, ann_min_rows=1000, ann_nprobe=4)
    before = cache.view(None)
    pick(before, data, cfg, registry)  # builds the index over 1500 rows
    # New rows, each a copy of a query's image and label text: its best demo from now on.
    extra = {key: data[key][1500:1532].copy() for key in data if key not in ("q_img", "q_txt")}
    extra["image_vecs"] = data["q_img"].copy()
    extra["label_vecs"] = data["q_txt"].copy()
    cache_of(extra, 0, 32, cache)
    after = cache.view(None)
    cand, got = pick(after, data, cfg, registry)
    assert [int(g[-1]) for g in got] == list(range(1500, 1532))  # most similar last
    # The older view, searched with the same (now larger) index, never sees them.
    cand_old, got_old = pick(before, data, cfg, registry)
    assert max(int(c.max()) for c in cand_old) < 1500
    assert all(np.array_equal(a, b) for a, b in zip(got_old, exact(before, data, cfg), strict=True))


def test_training_schedule_is_a_function_of_the_view_size() -> None:
    assert ann.train_rows(1000, min_rows=1000, growth=2.0) == 1000
    assert ann.train_rows(3999, min_rows=1000, growth=2.0) == 2000
    assert ann.train_rows(4000, min_rows=1000, growth=2.0) == 4000
    assert ann.train_rows(10, min_rows=1, growth=2.0) == 8
    assert ann.n_lists(1) == 1 and ann.n_lists(800_000) == 1789
    data = clustered(4, 2600)
    cache = cache_of(data, 0, 2600)
    registry = ann.IndexRegistry()
    cfg = SelectionConfig(strategy="rices", ann_min_rows=1000)
    assert registry.get(cache.view(19), cfg).trained_on == 1000  # 1216 rows
    assert registry.get(cache.view(None), cfg).trained_on == 2000
