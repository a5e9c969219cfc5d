"""The in-memory selection index of the pool: each run's rows as contiguous matrices.

Selection never scans the LanceDB table: a :class:`RunCache` holds one run's rows ordered
by ``(chunk, stream_pos, sample_id)`` in growable float32 buffers, loaded once from the
table and appended on every upsert, so "the pool before chunk c" is an O(1) prefix slice
(:class:`PoolView`). LanceDB stays the source of truth (:mod:`icd.storage.pool.table`).

Curated rows (:mod:`icd.method.curation`) stay in the cache with the chunk that took them
out of selection (``excluded``; :data:`LIVE` while selectable): the view before chunk c
leaves out the rows curated by chunks before c, so it is the pool as chunk c saw it
whenever it is read — before or after chunk c's own commit, in a run or in its resume.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# The columns a cache is loaded from (plus ``excluded_chunk`` where the table has it).
CACHE_COLUMNS = ["sample_id", "chunk", "stream_pos", "label", "image_vec", "label_vec"]
# ``excluded`` of a row no curation took out of selection.
LIVE = np.iinfo(np.int64).max


@dataclass(frozen=True)
class PoolView:
    """Pool rows as read-only numpy arrays, ordered by ``(chunk, stream_pos, sample_id)``.

    ``image_vecs`` and ``label_vecs`` are C-contiguous float32 ``[P, D]`` matrices (views
    on the cache, never copied per query). ``ids`` and ``labels`` are object arrays of str.
    ``version`` is the LanceDB version the rows were read at (None for a cache view).
    """

    ids: np.ndarray
    image_vecs: np.ndarray
    label_vecs: np.ndarray
    labels: np.ndarray
    chunk: np.ndarray
    stream_pos: np.ndarray
    run_ids: np.ndarray | None = None
    version: int | None = None

    def __len__(self) -> int:
        return len(self.ids)


def vectors(arr: pa.ChunkedArray | pa.Array, dim: int) -> np.ndarray:
    """A fixed-size-list column as a C-contiguous float32 [N, dim] matrix."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks else pa.array([], arr.type)
    flat = arr.flatten().to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(flat, dtype=np.float32).reshape(len(arr), dim)


def _readonly(a: np.ndarray) -> np.ndarray:
    a = a.view()
    a.flags.writeable = False
    return a


class RunCache:
    """One run's pool rows in growable buffers, kept sorted by (chunk, stream_pos, sample_id).

    Rows [0, n) are valid. Appends write past ``n`` (never into rows a view already
    covers); any other change builds new buffers, so a view handed out earlier is a
    stable snapshot. ``excluded[i]`` is the chunk whose curation took row i out of
    selection (:data:`LIVE` if none).
    """

    def __init__(self, dim: int, capacity: int = 1024) -> None:
        self.dim = dim
        self.n = 0
        self._alloc(max(capacity, 16))
        self.index: dict[str, int] = {}

    def _alloc(self, cap: int) -> None:
        self.cap = cap
        self.ids = np.empty(cap, dtype=object)
        self.labels = np.empty(cap, dtype=object)
        self.chunk = np.empty(cap, dtype=np.int64)
        self.stream_pos = np.empty(cap, dtype=np.int64)
        self.excluded = np.full(cap, LIVE, dtype=np.int64)
        self.image_vecs = np.empty((cap, self.dim), dtype=np.float32)
        self.label_vecs = np.empty((cap, self.dim), dtype=np.float32)

    @classmethod
    def from_arrow(cls, t: pa.Table, dim: int) -> RunCache:
        """A cache holding the rows of ``t`` (columns of ``CACHE_COLUMNS``), sorted; the
        vectors are copied once from Arrow into the buffers (gathered if out of order)."""
        n = t.num_rows
        ids = np.array(t.column("sample_id").to_pylist(), dtype=object)
        chunk = t.column("chunk").to_numpy()
        pos = t.column("stream_pos").to_numpy()
        order = np.lexsort((ids.astype(str), pos, chunk))
        in_order = bool(np.array_equal(order, np.arange(n)))
        cache = cls(dim, capacity=n + max(1024, n // 2))
        cache.ids[:n] = ids[order]
        cache.labels[:n] = np.array(t.column("label").to_pylist(), dtype=object)[order]
        cache.chunk[:n] = chunk[order]
        cache.stream_pos[:n] = pos[order]
        cache.excluded[:n] = _excluded(t)[order]
        for name, dst in (("image_vec", cache.image_vecs), ("label_vec", cache.label_vecs)):
            column = t.column(name)
            if in_order:
                offset = 0
                for part in column.chunks:
                    m = len(part)
                    dst[offset : offset + m] = vectors(part, dim)
                    offset += m
            else:
                np.take(vectors(column, dim), order, axis=0, out=dst[:n])
        cache.n = n
        cache.index = {sid: i for i, sid in enumerate(cache.ids[:n])}
        return cache

    def _arrays(self) -> tuple[np.ndarray, ...]:
        return (
            self.ids,
            self.labels,
            self.chunk,
            self.stream_pos,
            self.excluded,
            self.image_vecs,
            self.label_vecs,
        )

    def _grow(self, need: int) -> None:
        old = self._arrays()
        self._alloc(max(need, 2 * self.cap))
        for src, dst in zip(old, self._arrays(), strict=True):
            dst[: self.n] = src[: self.n]

    def _key(self, i: int) -> tuple[int, int, str]:
        return int(self.chunk[i]), int(self.stream_pos[i]), str(self.ids[i])

    def add(self, batch: dict[str, np.ndarray]) -> None:
        """Insert or replace rows (``batch`` arrays are already validated); they are live."""
        m = len(batch["ids"])
        if m == 0:
            return
        order = np.lexsort((batch["ids"].astype(str), batch["stream_pos"], batch["chunk"]))
        batch = {k: v[order] for k, v in batch.items()}
        first = (int(batch["chunk"][0]), int(batch["stream_pos"][0]), str(batch["ids"][0]))
        fresh = not any(i in self.index for i in batch["ids"])
        if fresh and (self.n == 0 or first > self._key(self.n - 1)):
            if self.n + m > self.cap:
                self._grow(self.n + m)
            lo, hi = self.n, self.n + m
            self.ids[lo:hi] = batch["ids"]
            self.labels[lo:hi] = batch["labels"]
            self.chunk[lo:hi] = batch["chunk"]
            self.stream_pos[lo:hi] = batch["stream_pos"]
            self.excluded[lo:hi] = LIVE
            self.image_vecs[lo:hi] = batch["image_vecs"]
            self.label_vecs[lo:hi] = batch["label_vecs"]
            for j, sid in enumerate(batch["ids"]):
                self.index[sid] = lo + j
            self.n = hi
            return
        self._rebuild(batch)

    def _rebuild(self, batch: dict[str, np.ndarray]) -> None:
        replaced = {sid for sid in batch["ids"] if sid in self.index}
        keep = np.array([sid not in replaced for sid in self.ids[: self.n]], dtype=bool)
        ids = np.concatenate([self.ids[: self.n][keep], batch["ids"]])
        labels = np.concatenate([self.labels[: self.n][keep], batch["labels"]])
        chunk = np.concatenate([self.chunk[: self.n][keep], batch["chunk"]])
        pos = np.concatenate([self.stream_pos[: self.n][keep], batch["stream_pos"]])
        excluded = np.concatenate([self.excluded[: self.n][keep], np.full(len(batch["ids"]), LIVE)])
        ivec = np.concatenate([self.image_vecs[: self.n][keep], batch["image_vecs"]])
        lvec = np.concatenate([self.label_vecs[: self.n][keep], batch["label_vecs"]])
        order = np.lexsort((ids.astype(str), pos, chunk))
        n = len(ids)
        self._alloc(max(2 * n, 1024))
        self.ids[:n] = ids[order]
        self.labels[:n] = labels[order]
        self.chunk[:n] = chunk[order]
        self.stream_pos[:n] = pos[order]
        self.excluded[:n] = excluded[order]
        self.image_vecs[:n] = ivec[order]
        self.label_vecs[:n] = lvec[order]
        self.n = n
        self.index = {sid: i for i, sid in enumerate(self.ids[:n])}

    def mark(self, excluded: dict[str, int]) -> None:
        """Set rows' ``excluded`` chunk (:data:`LIVE` to return a row to selection), in a
        new array: views handed out earlier keep what they saw."""
        marks = self.excluded.copy()
        for sid, chunk in excluded.items():
            marks[self.index[sid]] = chunk
        self.excluded = marks

    def marked(self) -> int:
        """Rows some curation took out of selection."""
        return int((self.excluded[: self.n] != LIVE).sum())

    def view(self, before_chunk: int | None, *, curated_before: int | None = None) -> PoolView:
        """The live rows with ``chunk < before_chunk`` (all chunks if None): rows curated by
        a chunk before ``curated_before`` (default ``before_chunk``; with both None, every
        curated row) are left out. Read-only views when nothing is left out, else copies."""
        n = self.n
        if before_chunk is not None:
            n = int(np.searchsorted(self.chunk[: self.n], before_chunk, side="left"))
        cut = curated_before if curated_before is not None else before_chunk
        live = self.excluded[:n] >= (LIVE if cut is None else cut)
        if live.all():
            pick: slice | np.ndarray = slice(0, n)
        else:
            pick = np.flatnonzero(live)
        return PoolView(
            ids=_readonly(self.ids[pick]),
            image_vecs=_readonly(self.image_vecs[pick]),
            label_vecs=_readonly(self.label_vecs[pick]),
            labels=_readonly(self.labels[pick]),
            chunk=_readonly(self.chunk[pick]),
            stream_pos=_readonly(self.stream_pos[pick]),
        )


def _excluded(t: pa.Table) -> np.ndarray:
    """The ``excluded_chunk`` column of ``t`` with :data:`LIVE` for nulls (all live when
    the table predates curation)."""
    if "excluded_chunk" not in t.column_names:
        return np.full(t.num_rows, LIVE, dtype=np.int64)
    col = pc.fill_null(t.column("excluded_chunk"), LIVE)
    return np.asarray(col.to_numpy(), dtype=np.int64)


def empty_view(dim: int | None) -> PoolView:
    """A view with no rows (``dim``-wide vector matrices; 0 when unknown)."""
    d = dim or 0
    return PoolView(
        ids=np.empty(0, dtype=object),
        image_vecs=np.zeros((0, d), dtype=np.float32),
        label_vecs=np.zeros((0, d), dtype=np.float32),
        labels=np.empty(0, dtype=object),
        chunk=np.zeros(0, dtype=np.int64),
        stream_pos=np.zeros(0, dtype=np.int64),
    )


def view_from_arrow(t: pa.Table, dim: int, version: int) -> PoolView:
    """A :class:`PoolView` of ``t`` (``run_id`` plus :data:`CACHE_COLUMNS`), in its row
    order, read at LanceDB ``version``; ``run_ids`` is filled."""
    return PoolView(
        ids=np.array(t.column("sample_id").to_pylist(), dtype=object),
        image_vecs=vectors(t.column("image_vec"), dim),
        label_vecs=vectors(t.column("label_vec"), dim),
        labels=np.array(t.column("label").to_pylist(), dtype=object),
        chunk=t.column("chunk").to_numpy(),
        stream_pos=t.column("stream_pos").to_numpy(),
        run_ids=np.array(t.column("run_id").to_pylist(), dtype=object),
        version=version,
    )
