"""Pool curation (docs/design.md §10): which demonstrations leave the selectable pool.

After a chunk's admissions the pool's live rows go through two rules, in this order:

1. **Label audit** (``method.pool.audit``): a live demo is *excluded* when more than
   ``audit_threshold`` of its ``audit_k`` nearest neighbours (cosine of the image
   embeddings) carry one and the same other label — its neighbours say "X", it says "Y".
   Neighbours of many different labels (a class with few demos yet) are no evidence.
   Neighbours are every row of the run admitted so far, curated ones included: curation
   takes a demo out of selection, not out of the evidence (without them, early
   exclusions on thin evidence cascade — on the mini-world a noisy pool then lost more
   right labels than wrong ones). Every live row is judged against the same set at once,
   so the verdict depends on the set of rows, not on their order. A row is judged only
   when at least ``audit_k`` other rows exist.
2. **Cap** (``method.pool.max_rows``): while more than ``max_rows`` rows are left, one is
   *evicted* — ``oldest``: the earliest in the stream; ``redundant``: the older row of the
   closest pair of same-label rows (by image embedding). ``redundant`` never evicts the
   only row of a label while some label has two or more; when every label has one row it
   evicts the oldest.

Ties (equal similarities, equal stream positions) are broken by sample id, and
similarities are compared rounded to ``1e-9``, so the decision is a function of the rows'
content alone. Cost: the audit compares every live row with every admitted row
(``O(L·N·d)`` per admitting chunk, blocked; the cap bounds ``L``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from icd.config import PoolConfig

EVICTED_OLDEST = "evicted_oldest"
EVICTED_REDUNDANT = "evicted_redundant"
LABEL_AUDIT = "label_audit"
EVICTION_REASONS = (EVICTED_OLDEST, EVICTED_REDUNDANT)
REASONS = (*EVICTION_REASONS, LABEL_AUDIT)

_DECIMALS = 9  # similarities are compared rounded (order-invariant ties)
_BLOCK = 1024  # rows of the similarity matrix computed at once


@dataclass(frozen=True)
class Curation:
    """What one curation decided: ``excluded`` (failed the label audit, sorted by id) and
    ``evicted`` (taken out for the cap, in eviction order, each for ``eviction_reason``)."""

    excluded: tuple[str, ...] = ()
    evicted: tuple[str, ...] = ()
    eviction_reason: str = EVICTED_OLDEST

    @property
    def reasons(self) -> dict[str, str]:
        """Each curated row's id -> why it left the pool (one of :data:`REASONS`)."""
        out = dict.fromkeys(self.excluded, LABEL_AUDIT)
        out.update(dict.fromkeys(self.evicted, self.eviction_reason))
        return out


def curate(
    *,
    ids: Sequence[str] | np.ndarray,
    labels: Sequence[str] | np.ndarray,
    image_vecs: np.ndarray,
    stream_pos: Sequence[int] | np.ndarray,
    rules: PoolConfig,
    live: Sequence[bool] | np.ndarray | None = None,
) -> Curation:
    """The curation of the run's rows given (parallel sequences: ids unique, ``image_vecs``
    an ``[n, d]`` matrix; ``live`` marks those still selectable, all when None; the others
    are audit evidence only): the audit's exclusions, then the evictions that leave at
    most ``rules.max_rows`` live rows. Only live rows are curated; nothing is when
    ``rules`` curate nothing."""
    ids_a = np.array([str(i) for i in ids], dtype=object)
    labels_a = np.array([str(lbl) for lbl in labels], dtype=object)
    pos = np.asarray(stream_pos, dtype=np.int64)
    alive = np.ones(len(ids_a), dtype=bool) if live is None else np.asarray(live, dtype=bool)
    sims = _Similarity(image_vecs, ids_a)
    excluded: list[str] = []
    if rules.audit:
        excluded = audit_labels(
            ids_a,
            labels_a,
            subjects=np.flatnonzero(alive),
            sims=sims,
            k=rules.audit_k,
            threshold=rules.audit_threshold,
        )
    reason = EVICTED_REDUNDANT if rules.evict == "redundant" else EVICTED_OLDEST
    evicted: list[str] = []
    out_of_pool = set(excluded)
    keep = alive & np.array([i not in out_of_pool for i in ids_a], dtype=bool)
    over = int(keep.sum()) - rules.max_rows if rules.max_rows is not None else 0
    if over > 0:
        rows = np.flatnonzero(keep)
        if rules.evict == "redundant":
            picked = evict_redundant(ids_a, labels_a, pos, rows=rows, sims=sims, n=over)
        else:
            picked = evict_oldest(ids_a, pos, rows=rows, n=over)
        evicted = [str(ids_a[i]) for i in picked]
    return Curation(tuple(sorted(excluded)), tuple(evicted), reason)


class _Similarity:
    """Rounded cosine similarities between rows of one matrix, and each id's rank."""

    def __init__(self, vecs: np.ndarray, ids: np.ndarray) -> None:
        v = np.asarray(vecs, dtype=np.float64)
        v = v.reshape(len(ids), v.shape[-1] if v.ndim == 2 else 0)
        norms = np.linalg.norm(v, axis=1, keepdims=True)
        self.unit = np.divide(v, norms, out=np.zeros_like(v), where=norms > 0)
        rank = np.empty(len(ids), dtype=np.int64)
        rank[np.argsort(ids.astype(str), kind="stable")] = np.arange(len(ids))
        self.id_rank = rank

    def block(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Similarities ``[len(rows), len(cols)]``."""
        return np.round(self.unit[rows] @ self.unit[cols].T, _DECIMALS)


def audit_labels(
    ids: np.ndarray,
    labels: np.ndarray,
    *,
    subjects: np.ndarray,
    sims: _Similarity,
    k: int,
    threshold: float,
) -> list[str]:
    """Ids of the ``subjects`` (row indices) whose ``k`` nearest other rows contradict
    their label: more than ``threshold`` of those neighbours carry one other label (see
    the module docstring)."""
    n = len(ids)
    if n <= k:
        return []
    everyone = np.arange(n)
    out = []
    for lo in range(0, len(subjects), _BLOCK):
        rows = subjects[lo : lo + _BLOCK]
        s = sims.block(rows, everyone)
        s[np.arange(len(rows)), rows] = -np.inf  # not its own neighbour
        for r, row in enumerate(rows):
            near = _nearest(s[r], sims.id_rank, k)
            others = Counter(str(lbl) for lbl in labels[near] if lbl != labels[row])
            if others and max(others.values()) / k > threshold:
                out.append(str(ids[row]))
    return out


def _nearest(sim: np.ndarray, id_rank: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` columns of highest similarity, ties broken by id rank."""
    cut = np.partition(sim, len(sim) - k)[len(sim) - k]  # the k-th highest value
    cand = np.flatnonzero(sim >= cut)
    order = np.lexsort((id_rank[cand], -sim[cand]))
    return cand[order[:k]]


def evict_oldest(ids: np.ndarray, stream_pos: np.ndarray, *, rows: np.ndarray, n: int) -> list[int]:
    """The ``n`` rows (indices among ``rows``) earliest in the stream, ties by id."""
    order = np.lexsort((ids[rows].astype(str), stream_pos[rows]))
    return [int(i) for i in rows[order[:n]]]


def evict_redundant(
    ids: np.ndarray,
    labels: np.ndarray,
    stream_pos: np.ndarray,
    *,
    rows: np.ndarray,
    sims: _Similarity,
    n: int,
) -> list[int]:
    """``n`` rows (indices among ``rows``) evicted one at a time: the older of the closest
    same-label pair left; the oldest row once every label is down to one row."""
    groups: dict[str, np.ndarray] = {}
    for label in sorted(set(labels[rows])):
        groups[label] = rows[labels[rows] == label]
    within = {label: sims.block(g, g) for label, g in groups.items()}
    alive = {label: np.ones(len(g), dtype=bool) for label, g in groups.items()}
    out: list[int] = []
    while len(out) < n:
        best: tuple[float, int, str, str, int] | None = None  # (-sim, pos, id, label, j)
        for label, g in groups.items():
            live = alive[label]
            if live.sum() < 2:
                continue
            s = np.where(live[None, :] & live[:, None], within[label], -np.inf)
            np.fill_diagonal(s, -np.inf)
            nearest = s.max(axis=1)
            for j in np.flatnonzero(live):
                key = (-float(nearest[j]), int(stream_pos[g[j]]), str(ids[g[j]]), label, int(j))
                if best is None or key[:3] < best[:3]:
                    best = key
        if best is None:  # one row per label: the oldest goes
            gone = set(out)
            left = np.array([i for i in rows if i not in gone], dtype=np.int64)
            out.extend(evict_oldest(ids, stream_pos, rows=left, n=n - len(out)))
            break
        label, pick = best[3], best[4]
        alive[label][pick] = False
        out.append(int(groups[label][pick]))
    return out
