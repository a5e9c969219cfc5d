"""Demonstration selection over the pool's vectors, batched over queries (docs/design.md §2.6).

Inputs are row matrices of L2-normalised embeddings (so cosine similarity is a dot product):
``query_img [B, D]`` (the queries' images), ``query_txt [B, D]`` or None (the text embedding of
each query's zero-shot student answer), ``pool_img [P, D]`` (demo images) and
``pool_txt [P, D]`` (demo label texts). For query x and pool row d::

    score = w_ii·cos(img_x, img_d) + w_it·cos(img_x, txt_d) + w_tt·cos(txt_x, txt_d)

Strategies:

- ``random``: k rows drawn without replacement from a generator seeded by ``(seed, query id)``,
  so a query's demos do not depend on which other queries share its batch.
- ``rices``: image→image only. ``cross_modal``: image→label-text only.
- ``combined``: the weighted sum above with ``cfg.w_ii, w_it, w_tt``; the text→text term is
  skipped when ``query_txt`` is None, and a zero weight skips its term.
- ``cascade``: stage 1 shortlists ``max(cfg.shortlist, k)`` rows by image→label-text score;
  rows of one label share one label vector and so tie, and such ties are broken by the
  image→image score. Stage 2 orders the shortlist by image→image and keeps its best ``2k``
  rows; stage 3 orders those by text→text (student answer vs label; skipped when
  ``query_txt`` is None) and the first k are the demos. Should the shortlist hold fewer
  than 2k rows, stage 3 orders all of it.

Ranking order is score descending, then (cascade stage 1) the secondary score, then the lower
pool row. A per-label cap m (``cfg.per_label_cap``) keeps a row only if fewer than m
better-ranked rows share its label — i.e. the greedy walk down the ranking, which for the
weighted strategies is exactly the best k-subset under the cap. For the cascade the cap
applies to the stage-1 shortlist (at most m rows per label enter it), so the whole cascade
respects it. Fewer than k rows come back only when the pool (under the cap) has fewer.
Returned indices are ordered for the prompt: with ``cfg.most_similar_last`` the best demo
comes last, nearest the query (``random`` keeps its draw order).

Big pools: ``rices``, ``combined`` and ``cascade`` can rank a shortlist per query instead of
the whole pool (``candidates`` of :func:`select_demos`). Each of their first-stage scores is
one inner product of a joint query with the joint pool row ``[img_d | txt_d]``
(:func:`ann_query`), so one inner-product index over the joint rows shortlists for all three;
the shortlist (:func:`ann_candidate_count` rows) is then ranked exactly, by the rules below.
The index itself lives in :mod:`icd.storage.pool.ann`.

Cost: one ``[B, D] × [D, P]`` matmul per pool matrix read (the image→text and text→text terms
share one), an ``argpartition`` for the top candidates, sorting only those. With a cap, rows
whose first ``max(4k, k + 16)`` candidates cannot fill k slots fall back to a per-label
top-m (m passes of ``reduceat`` over their score rows), never to a full sort.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import overload

import numpy as np

from icd.config import SelectionConfig

STRATEGIES = ("random", "rices", "cross_modal", "combined", "cascade")


def strategy_weights(cfg: SelectionConfig) -> tuple[float, float, float]:
    """(w_ii, w_it, w_tt) the strategy ranks by (cascade: the combined weights, for reporting)."""
    if cfg.strategy == "rices":
        return 1.0, 0.0, 0.0
    if cfg.strategy == "cross_modal":
        return 0.0, 1.0, 0.0
    if cfg.strategy == "random":
        return 0.0, 0.0, 0.0
    return cfg.w_ii, cfg.w_it, cfg.w_tt


@overload
def _f32(x: np.ndarray, name: str) -> np.ndarray: ...
@overload
def _f32(x: None, name: str) -> None: ...
@overload
def _f32(x: np.ndarray | None, name: str) -> np.ndarray | None: ...
def _f32(x: np.ndarray | None, name: str) -> np.ndarray | None:
    if x is None:
        return None
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-d matrix, got shape {x.shape}")
    return x


def _weighted(
    weights: tuple[float, float, float],
    query_img: np.ndarray,
    query_txt: np.ndarray | None,
    pool_img: np.ndarray,
    pool_txt: np.ndarray,
) -> np.ndarray:
    w_ii, w_it, w_tt = weights
    out = None
    if w_ii:
        out = (query_img * np.float32(w_ii)) @ pool_img.T
    text_query = query_img * np.float32(w_it) if w_it else None
    if w_tt and query_txt is not None:
        tt = query_txt * np.float32(w_tt)
        text_query = tt if text_query is None else text_query + tt
    if text_query is not None:
        if out is None:
            out = text_query @ pool_txt.T
        else:
            out += text_query @ pool_txt.T
    if out is None:
        out = np.zeros((query_img.shape[0], pool_img.shape[0]), dtype=np.float32)
    return out


def similarities(
    query_img: np.ndarray,
    query_txt: np.ndarray | None,
    pool_img: np.ndarray,
    pool_txt: np.ndarray,
    cfg: SelectionConfig,
) -> np.ndarray:
    """The ``[B, P]`` weighted similarity matrix for ``cfg.strategy`` (see the module docstring).

    ``random`` similarities are all zero; ``cascade`` reports the combined weighted one.
    """
    qi, qt = _f32(query_img, "query_img"), _f32(query_txt, "query_txt")
    pi, pt = _f32(pool_img, "pool_img"), _f32(pool_txt, "pool_txt")
    return _weighted(strategy_weights(cfg), qi, qt, pi, pt)


class _LabelCodes:
    """Integer codes for the pool labels (equal code = equal label): for a few rows on
    demand, or for the whole pool once."""

    def __init__(self, labels: Sequence[str] | np.ndarray) -> None:
        self.labels = labels
        self._codes: np.ndarray | None = None
        self._groups: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        if isinstance(labels, np.ndarray) and labels.dtype.kind in "iu":
            self._codes = labels.astype(np.int64, copy=False)

    def of(self, rows: np.ndarray) -> np.ndarray:
        """Codes for an index array of any shape (consistent within this object)."""
        if self._codes is None and rows.size >= len(self.labels) // 4:
            return self.codes[rows]
        if self._codes is not None:
            return self._codes[rows]
        seen: dict[str, int] = {}
        flat = [seen.setdefault(self.labels[j], len(seen)) for j in rows.ravel().tolist()]
        return np.asarray(flat, dtype=np.int64).reshape(rows.shape)

    @property
    def codes(self) -> np.ndarray:
        if self._codes is None:
            seen: dict[str, int] = {}
            self._codes = np.fromiter(
                (seen.setdefault(lab, len(seen)) for lab in self.labels), np.int64, len(self.labels)
            )
        return self._codes

    def groups(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(columns sorted by label, stably; start of each label's run; run lengths)."""
        if self._groups is None:
            order = np.argsort(self.codes, kind="stable")
            sorted_codes = self.codes[order]
            starts = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]])
            sizes = np.diff(np.r_[starts, len(order)])
            self._groups = (order, starts, sizes)
        return self._groups


def _order_key(prim: np.ndarray, sec: np.ndarray | None, cols: np.ndarray) -> np.ndarray:
    """Reorder ``cols [B, c]`` best first: primary desc, secondary desc, column asc."""
    keys = [cols]
    if sec is not None:
        keys.append(-np.take_along_axis(sec, cols, axis=1))
    keys.append(-np.take_along_axis(prim, cols, axis=1))
    return np.take_along_axis(cols, np.lexsort(keys, axis=1), axis=1)


def _top(prim: np.ndarray, sec: np.ndarray | None, c: int) -> np.ndarray:
    """The c best columns of each row ``[B, c]``, best first (the ranking order above)."""
    n = prim.shape[1]
    if c >= n:
        return _order_key(prim, sec, np.broadcast_to(np.arange(n), prim.shape))
    part = np.argpartition(prim, n - c, axis=1)[:, n - c :]
    vals = np.take_along_axis(prim, part, axis=1)
    kth = vals.min(axis=1)
    inside = (vals == kth[:, None]).sum(axis=1)
    total = (prim == kth[:, None]).sum(axis=1)
    for b in np.flatnonzero(total > inside):
        # A run of equal scores crosses the cut: let the best-ranked of the run in.
        above = np.flatnonzero(prim[b] > kth[b])
        tied = np.flatnonzero(prim[b] == kth[b])
        if sec is not None:
            tied = tied[np.lexsort((tied, -sec[b, tied]))]
        part[b] = np.concatenate([above, tied[: c - len(above)]])
    return _order_key(prim, sec, part)


def _capped_rows(cands: np.ndarray, labels: _LabelCodes, cap: int) -> np.ndarray:
    """Mask over ``cands [B, c]`` (best first): True where fewer than ``cap`` earlier
    candidates of the row share the label."""
    lab = labels.of(cands)
    n = lab.shape[1]
    order = np.argsort(lab, axis=1, kind="stable")  # groups labels, keeps candidate order
    grouped = np.take_along_axis(lab, order, axis=1)
    pos = np.broadcast_to(np.arange(n), lab.shape)
    start = np.ones(lab.shape, dtype=bool)
    start[:, 1:] = grouped[:, 1:] != grouped[:, :-1]
    first = np.maximum.accumulate(np.where(start, pos, 0), axis=1)
    rank = np.empty_like(lab)
    np.put_along_axis(rank, order, pos - first, axis=1)
    return rank < cap


def _per_label_top(
    prim: np.ndarray, sec: np.ndarray | None, labels: _LabelCodes, cap: int
) -> np.ndarray:
    """For each row, the best ``cap`` columns of every label, as ``[B, L·cap]`` columns
    padded with -1 where a label has fewer rows."""
    order, starts, sizes = labels.groups()
    n = len(order)
    s = prim[:, order]  # columns grouped by label (a copy, masked below)
    t = None if sec is None else sec[:, order]
    pos = np.arange(n)
    out = []
    for _ in range(cap):
        best = np.maximum.reduceat(s, starts, axis=1)
        hit = s == np.repeat(best, sizes, axis=1)
        if t is not None:
            best_sec = np.maximum.reduceat(np.where(hit, t, -np.inf), starts, axis=1)
            hit &= t == np.repeat(best_sec, sizes, axis=1)
        first = np.minimum.reduceat(np.where(hit, pos, n), starts, axis=1)
        alive = best > -np.inf
        rows, groups = np.nonzero(alive)
        s[rows, first[rows, groups]] = -np.inf
        if t is not None:
            t[rows, first[rows, groups]] = -np.inf
        out.append(np.where(alive, order[np.minimum(first, n - 1)], -1))
    return np.concatenate(out, axis=1)


def _ranked(
    prim: np.ndarray,
    sec: np.ndarray | None,
    c: int,
    labels: _LabelCodes,
    cap: int | None,
) -> list[np.ndarray]:
    """Per row, the first c columns of the ranking (under the per-label cap), best first."""
    n_pool = prim.shape[1]
    if cap is None:
        return list(_top(prim, sec, min(c, n_pool)))
    first = min(n_pool, max(4 * c, c + 16))
    cands = _top(prim, sec, first)
    keep = _capped_rows(cands, labels, cap)
    out = [row[m][:c] for row, m in zip(cands, keep, strict=True)]
    short = [b for b, row in enumerate(out) if len(row) < c] if first < n_pool else []
    if short:
        # The first candidates are crowded by few labels: take each label's best `cap`.
        per_label = _per_label_top(prim[short], None if sec is None else sec[short], labels, cap)
        for i, b in enumerate(short):
            row = per_label[i][per_label[i] >= 0]
            p_row, s_row = prim[b : b + 1], None if sec is None else sec[b : b + 1]
            out[b] = _order_key(p_row, s_row, row[None, :])[0][:c]
    return out


def _query_rng(seed: int, qid: str) -> np.random.Generator:
    h = int.from_bytes(hashlib.sha256(qid.encode()).digest()[:8], "little")
    return np.random.default_rng([seed & 0xFFFFFFFFFFFFFFFF, h])


def _select_random(
    n_pool: int, labels: _LabelCodes, k: int, cap: int | None, seed: int, ids: Sequence[str]
) -> list[np.ndarray]:
    out = []
    for qid in ids:
        c = min(n_pool, k if cap is None else 4 * k + 16)
        cands = _query_rng(seed, qid).choice(n_pool, size=c, replace=False)
        if cap is not None:
            cands = cands[_capped_rows(cands[None, :], labels, cap)[0]]
            if len(cands) < k and c < n_pool:
                # The cap needs more of the pool: a full permutation from the same seed.
                cands = _query_rng(seed, qid).permutation(n_pool)
                cands = cands[_capped_rows(cands[None, :], labels, cap)[0]]
        out.append(cands[:k].astype(np.int64))
    return out


def _select_cascade(
    query_img: np.ndarray,
    query_txt: np.ndarray | None,
    pool_img: np.ndarray,
    pool_txt: np.ndarray,
    labels: _LabelCodes,
    cfg: SelectionConfig,
) -> list[np.ndarray]:
    k = cfg.k
    it = query_img @ pool_txt.T
    ii = query_img @ pool_img.T
    shortlists = _ranked(it, ii, max(cfg.shortlist, k), labels, cfg.per_label_cap)
    out = []
    for b, rows in enumerate(shortlists):
        # Stage 2: image→image over the shortlist; keep the best 2k.
        rows = rows[np.lexsort((rows, -ii[b, rows]))][: 2 * k]
        # Stage 3: text→text (student answer vs label) over those.
        if query_txt is not None and len(rows):
            rows = rows[np.lexsort((rows, -(pool_txt[rows] @ query_txt[b])))]
        out.append(rows[:k].astype(np.int64))
    return out


# Strategies that may rank an approximate index's shortlist instead of the whole pool.
ANN_STRATEGIES = ("rices", "combined", "cascade")
# Cascade stage 1 through the index: image→text, with image→image as a faint tie-breaker
# (rows of one label share one label vector, so their image→text scores tie).
_CASCADE_TIE = 1e-3


def ann_applies(cfg: SelectionConfig) -> bool:
    """True when ``cfg`` may rank an index's shortlist: a strategy of :data:`ANN_STRATEGIES`
    with k > 0, except ``cascade`` under a per-label cap (its stage-1 shortlist spreads over
    many labels, which a shortlist of nearest rows does not reach: it stays exact)."""
    if cfg.strategy not in ANN_STRATEGIES or cfg.k == 0:
        return False
    return not (cfg.strategy == "cascade" and cfg.per_label_cap is not None)


def ann_query(
    query_img: np.ndarray, query_txt: np.ndarray | None, cfg: SelectionConfig
) -> np.ndarray:
    """The ``[B, 2D]`` queries for an inner-product index over joint pool rows
    ``[image_vec | label_vec]``: ``q · [img_d | txt_d]`` is the score the strategy ranks by
    (``rices``: image→image; ``combined``: the weighted sum, its text→text term dropped when
    ``query_txt`` is None; ``cascade``: its stage-1 image→text score, ties leaning to
    image→image). Raises ``ValueError`` for a strategy not in :data:`ANN_STRATEGIES`."""
    qi = _f32(query_img, "query_img")
    qt = _f32(query_txt, "query_txt")
    if cfg.strategy == "cascade":
        w_ii, w_it, w_tt = _CASCADE_TIE, 1.0, 0.0
    elif cfg.strategy in ANN_STRATEGIES:
        w_ii, w_it, w_tt = strategy_weights(cfg)
    else:
        raise ValueError(f"strategy {cfg.strategy!r} does not select through an index")
    txt = qi * np.float32(w_it)
    if w_tt and qt is not None:
        txt = txt + qt * np.float32(w_tt)
    return np.ascontiguousarray(np.hstack([qi * np.float32(w_ii), txt]), dtype=np.float32)


def ann_candidate_count(cfg: SelectionConfig) -> int:
    """How many rows per query an approximate index should shortlist for ``cfg``: enough that
    the exact ranking of the shortlist (:func:`select_demos` with ``candidates``) finds the
    same k demos as the whole pool would, with room for the per-label cap."""
    first = max(cfg.shortlist, cfg.k) if cfg.strategy == "cascade" else cfg.k
    c = max(8 * first, first + 32)
    return 2 * c if cfg.per_label_cap is not None else c


def _select_scored(
    qi: np.ndarray,
    qt: np.ndarray | None,
    pi: np.ndarray,
    pt: np.ndarray,
    labels: _LabelCodes,
    cfg: SelectionConfig,
) -> list[np.ndarray]:
    """Best-first picks of a scored strategy (no prompt ordering yet)."""
    if cfg.strategy == "cascade":
        return _select_cascade(qi, qt, pi, pt, labels, cfg)
    s = _weighted(strategy_weights(cfg), qi, qt, pi, pt)
    return [row.astype(np.int64) for row in _ranked(s, None, cfg.k, labels, cfg.per_label_cap)]


def _select_among(
    qi: np.ndarray,
    qt: np.ndarray | None,
    pi: np.ndarray,
    pt: np.ndarray,
    labels: _LabelCodes,
    cfg: SelectionConfig,
    candidates: Sequence[np.ndarray],
) -> list[np.ndarray]:
    """Per query, the exact ranking restricted to its candidate rows; a query whose
    candidates cannot fill k slots (under the cap) is ranked over the whole pool."""
    n_pool = pi.shape[0]
    out: list[np.ndarray] = []
    short: list[int] = []
    for b, cand in enumerate(candidates):
        rows = np.unique(np.asarray(cand, dtype=np.int64))  # ascending: ties go to the lower row
        rows = rows[(rows >= 0) & (rows < n_pool)]
        sub = _LabelCodes(labels.of(rows)) if cfg.per_label_cap is not None else labels
        q_txt = None if qt is None else qt[b : b + 1]
        picked = _select_scored(qi[b : b + 1], q_txt, pi[rows], pt[rows], sub, cfg)[0]
        out.append(rows[picked])
        if len(picked) < cfg.k and len(rows) < n_pool:
            short.append(b)
    if short:
        q_txt = None if qt is None else qt[short]
        exact = _select_scored(qi[short], q_txt, pi, pt, labels, cfg)
        for b, picked in zip(short, exact, strict=True):
            out[b] = picked
    return out


def _check_pool(
    qi: np.ndarray,
    qt: np.ndarray | None,
    pi: np.ndarray,
    pt: np.ndarray,
    *,
    n_pool: int,
    strategy: str,
) -> None:
    """``ValueError`` unless the pool's vectors have a row per pool label and (ranking
    strategies) the queries' and the pool's vectors one dimension."""
    if pi.shape[0] != n_pool or pt.shape[0] != n_pool:
        raise ValueError("pool_img, pool_txt and pool_labels must have the same number of rows")
    if strategy != "random":
        dims = {qi.shape[1], pi.shape[1], pt.shape[1]} | (
            {qt.shape[1]} if qt is not None else set()
        )
        if len(dims) > 1:
            raise ValueError("query and pool vectors must have the same dimension")


def select_demos(
    query_img: np.ndarray,
    query_txt: np.ndarray | None,
    pool_img: np.ndarray,
    pool_txt: np.ndarray,
    pool_labels: Sequence[str] | np.ndarray,
    cfg: SelectionConfig,
    seed: int = 0,
    query_ids: Sequence[str] | None = None,
    *,
    candidates: Sequence[np.ndarray] | None = None,
) -> list[np.ndarray]:
    """For each of the B queries, the pool rows to show as demos, ordered for the prompt.

    Returns B int64 arrays of at most ``cfg.k`` distinct pool row indices (fewer only when the
    pool, under the per-label cap, has fewer rows). Deterministic for the same inputs and
    ``seed``; ``random`` depends only on ``(seed, query id)`` per query (``query_ids``; the
    row number in the batch when None). ``pool_labels`` may be strings or integer label
    codes (equal code = equal label; only read when a per-label cap is set). Raises
    ``ValueError`` on mismatched shapes.

    ``candidates`` (one array of pool rows per query, e.g. an approximate index's shortlist;
    ignored by ``random``) restricts each query's ranking to those rows: the demos are the
    exact ranking of the candidates under the same rules and tie-breaks, so they equal the
    whole pool's whenever the candidates hold its best rows. A query whose candidates give
    fewer than k demos is ranked over the whole pool instead.
    """
    qi = _f32(query_img, "query_img")
    qt = _f32(query_txt, "query_txt")
    if cfg.least_similar:  # the ablation: every cosine, hence every score, changes sign
        qi, qt = -qi, None if qt is None else -qt
    n_queries = qi.shape[0]
    n_pool = len(pool_labels)
    if cfg.strategy not in STRATEGIES:
        raise ValueError(f"unknown selection strategy {cfg.strategy!r}")
    if qt is not None and qt.shape[0] != n_queries:
        raise ValueError("query_txt must have one row per query")
    if query_ids is not None and len(query_ids) != n_queries:
        raise ValueError("query_ids must have one id per query")
    if candidates is not None and len(candidates) != n_queries:
        raise ValueError("candidates must have one row array per query")
    k = cfg.k
    if k == 0 or n_pool == 0 or n_queries == 0:
        return [np.zeros(0, dtype=np.int64) for _ in range(n_queries)]
    pi, pt = _f32(pool_img, "pool_img"), _f32(pool_txt, "pool_txt")
    _check_pool(qi, qt, pi, pt, n_pool=n_pool, strategy=cfg.strategy)
    labels = _LabelCodes(pool_labels)
    if cfg.strategy == "random":
        ids = list(query_ids) if query_ids is not None else [str(b) for b in range(n_queries)]
        return _select_random(n_pool, labels, k, cfg.per_label_cap, seed, ids)
    if candidates is not None:
        picked = _select_among(qi, qt, pi, pt, labels, cfg, candidates)
    else:
        picked = _select_scored(qi, qt, pi, pt, labels, cfg)
    if cfg.most_similar_last:
        picked = [row[::-1].copy() for row in picked]
    return picked
