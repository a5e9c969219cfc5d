"""The demonstration pool: accepted teacher annotations, durable in LanceDB.

One LanceDB table (default ``demos``) at the pool URI (a local folder by default, any
LanceDB URI works) holds the pool rows of every run that shares it. A row is identified
by ``(run_id, sample_id)``, stored as the single column ``key = "run_id/sample_id"``,
which is the table's (unenforced) primary key: writes are ``merge_insert`` upserts on it,
so re-adding a chunk never duplicates a row — also when two processes insert the same
rows at once (LanceDB detects that conflict only for a primary-key merge; a merge on a
composite or non-key column lets both inserts through). Each upsert is one LanceDB
version that can be checked out later ("the pool as it was after chunk c").

Selection never scans the table: each run's vectors live in an in-memory cache ordered by
``(chunk, stream_pos, sample_id)``, loaded once from LanceDB and appended on every upsert,
so ``view(run_id, before_chunk=c)`` is an O(1) prefix slice of contiguous float32
matrices. LanceDB stays the source of truth: a new handle (a resumed run, another
process) loads the cache from the table, and commits by other processes to the same run
are detected and reloaded.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import Counter
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import lancedb
import numpy as np
import pyarrow as pa

from icd.storage.locks import file_lock

log = logging.getLogger(__name__)

DEFAULT_TABLE = "demos"
MERGE_KEY = "key"
# Field metadata that makes a column the table's unenforced primary key, set at creation
# so the key is in place before the first write (same as set_unenforced_primary_key).
_PRIMARY_KEY_META = {"lance-schema:unenforced-primary-key:position": "1"}
REQUIRED_FIELDS = ("sample_id", "run_id", "chunk", "stream_pos", "image_vec", "label", "label_vec")
OPTIONAL_FIELDS = (
    "question",
    "image",
    "votes",
    "agreement",
    "uncertainty",
    "teacher",
    "created_at",
)
VECTOR_FIELDS = ("image_vec", "label_vec")
# Versions are kept by compaction unless asked otherwise: every chunk's commit stays
# checkout-able (a run's manifest maps chunk -> version).
_KEEP_VERSIONS = timedelta(days=365 * 100)
_CACHE_COLUMNS = ["sample_id", "chunk", "stream_pos", "label", "image_vec", "label_vec"]
_IN_LIST_BATCH = 512


class PoolError(ValueError):
    """A pool that cannot be opened or a write that was rejected (one-line message)."""


def pool_schema(dim: int) -> pa.Schema:
    """The Arrow schema of the pool table for ``dim``-dimensional vectors."""
    vec = pa.list_(pa.float32(), dim)
    return pa.schema(
        [
            pa.field(MERGE_KEY, pa.string(), nullable=False, metadata=_PRIMARY_KEY_META),
            pa.field("sample_id", pa.string(), nullable=False),
            pa.field("run_id", pa.string(), nullable=False),
            pa.field("chunk", pa.int64(), nullable=False),
            pa.field("stream_pos", pa.int64(), nullable=False),
            pa.field("question", pa.string()),
            pa.field("image", pa.binary()),
            pa.field("image_vec", vec, nullable=False),
            pa.field("label", pa.string(), nullable=False),
            pa.field("label_vec", vec, nullable=False),
            pa.field("votes", pa.list_(pa.string())),
            pa.field("agreement", pa.float64()),
            pa.field("uncertainty", pa.float64()),
            pa.field("teacher", pa.string()),
            pa.field("created_at", pa.timestamp("us", tz="UTC")),
        ]
    )


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


def row_key(run_id: str, sample_id: str) -> str:
    """The pool's primary key of a row."""
    return f"{run_id}/{sample_id}"


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    msg = text[0] if text else e.__class__.__name__
    return msg if len(msg) <= 240 else msg[:237] + "..."


def _sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def _vectors(arr: pa.ChunkedArray | pa.Array, dim: int) -> np.ndarray:
    """A fixed-size-list column as a C-contiguous float32 [N, dim] matrix."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks else pa.array([], arr.type)
    flat = arr.flatten().to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(flat, dtype=np.float32).reshape(len(arr), dim)


def _readonly(a: np.ndarray) -> np.ndarray:
    a = a.view()
    a.flags.writeable = False
    return a


class _RunCache:
    """One run's pool rows in growable buffers, kept sorted by (chunk, stream_pos, sample_id).

    Rows [0, n) are valid. Appends write past ``n`` (never into rows a view already
    covers); any other change builds new buffers, so a view handed out earlier is a
    stable snapshot.
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
        self.image_vecs = np.empty((cap, self.dim), dtype=np.float32)
        self.label_vecs = np.empty((cap, self.dim), dtype=np.float32)

    @classmethod
    def from_arrow(cls, t: pa.Table, dim: int) -> _RunCache:
        """A cache holding the rows of ``t`` (columns of ``_CACHE_COLUMNS``), sorted; the
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
        for name, dst in (("image_vec", cache.image_vecs), ("label_vec", cache.label_vecs)):
            column = t.column(name)
            if in_order:
                offset = 0
                for part in column.chunks:
                    m = len(part)
                    dst[offset : offset + m] = _vectors(part, dim)
                    offset += m
            else:
                np.take(_vectors(column, dim), order, axis=0, out=dst[:n])
        cache.n = n
        cache.index = {sid: i for i, sid in enumerate(cache.ids[:n])}
        return cache

    def _grow(self, need: int) -> None:
        old = (self.ids, self.labels, self.chunk, self.stream_pos, self.image_vecs, self.label_vecs)
        self._alloc(max(need, 2 * self.cap))
        new = (self.ids, self.labels, self.chunk, self.stream_pos, self.image_vecs, self.label_vecs)
        for src, dst in zip(old, new, strict=True):
            dst[: self.n] = src[: self.n]

    def _key(self, i: int) -> tuple[int, int, str]:
        return int(self.chunk[i]), int(self.stream_pos[i]), str(self.ids[i])

    def add(self, batch: dict[str, np.ndarray]) -> None:
        """Insert or replace rows (``batch`` arrays are already validated)."""
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
        ivec = np.concatenate([self.image_vecs[: self.n][keep], batch["image_vecs"]])
        lvec = np.concatenate([self.label_vecs[: self.n][keep], batch["label_vecs"]])
        order = np.lexsort((ids.astype(str), pos, chunk))
        n = len(ids)
        self._alloc(max(2 * n, 1024))
        self.ids[:n] = ids[order]
        self.labels[:n] = labels[order]
        self.chunk[:n] = chunk[order]
        self.stream_pos[:n] = pos[order]
        self.image_vecs[:n] = ivec[order]
        self.label_vecs[:n] = lvec[order]
        self.n = n
        self.index = {sid: i for i, sid in enumerate(self.ids[:n])}

    def view(self, before_chunk: int | None) -> PoolView:
        n = self.n
        if before_chunk is not None:
            n = int(np.searchsorted(self.chunk[: self.n], before_chunk, side="left"))
        return PoolView(
            ids=_readonly(self.ids[:n]),
            image_vecs=_readonly(self.image_vecs[:n]),
            label_vecs=_readonly(self.label_vecs[:n]),
            labels=_readonly(self.labels[:n]),
            chunk=_readonly(self.chunk[:n]),
            stream_pos=_readonly(self.stream_pos[:n]),
        )


def _empty_view(dim: int | None, version: int | None = None) -> PoolView:
    d = dim or 0
    return PoolView(
        ids=np.empty(0, dtype=object),
        image_vecs=np.zeros((0, d), dtype=np.float32),
        label_vecs=np.zeros((0, d), dtype=np.float32),
        labels=np.empty(0, dtype=object),
        chunk=np.zeros(0, dtype=np.int64),
        stream_pos=np.zeros(0, dtype=np.int64),
        version=version,
    )


class DemoPool:
    """Handle on the pool table ``table`` at ``uri``.

    The table is created on the first upsert (or at once when ``dim`` is given); its vector
    dimension is fixed from then on. With ``must_exist=True`` (read-only tools) a missing
    pool raises :class:`PoolError` instead of being created. A URI that cannot be reached
    raises :class:`PoolError` with a one-line message.

    Safe to share between threads of one process. Several processes may write the same
    table at once: LanceDB retries conflicting commits, and because the merge key is the
    table's primary key, two processes inserting the same row leave one row.
    """

    def __init__(
        self,
        uri: str | Path,
        table: str = DEFAULT_TABLE,
        dim: int | None = None,
        must_exist: bool = False,
    ) -> None:
        self.uri = str(uri)
        self.table_name = table
        self._lock = threading.RLock()
        self._caches: dict[str, _RunCache] = {}
        self._commits = 0
        self._commits_at_compact = 0
        if must_exist and _is_local(self.uri):
            path = Path(self.uri.removeprefix("file://"))
            if not path.is_dir():
                raise PoolError(f"no pool at {self.uri!r} (the folder does not exist)")
        try:
            self._db = lancedb.connect(self.uri, read_consistency_interval=timedelta(0))
            self._tbl = self._open_table()
        except PoolError:
            raise
        except Exception as e:
            raise PoolError(f"cannot open pool at {self.uri!r}: {_one_line(e)}") from None
        if self._tbl is None:
            if must_exist:
                raise PoolError(f"no pool table {table!r} at {self.uri!r}")
            self.dim = dim
            if dim is not None:
                self._create(dim)
        else:
            with self._creation_lock():
                self._ensure_primary_key()
            self.dim = self._table_dim()
            if dim is not None and dim != self.dim:
                raise PoolError(
                    f"pool {table!r} at {self.uri!r} holds {self.dim}-d vectors, not {dim}-d"
                )
        self._known_version = self._tbl.version if self._tbl is not None else 0

    # -- opening -------------------------------------------------------------------------

    def _open_table(self) -> Any:
        try:
            return self._db.open_table(self.table_name)
        except ValueError as e:
            if "not found" in str(e) or "was not found" in str(e):
                return None
            raise

    def _creation_lock(self) -> AbstractContextManager[Any]:
        """A file lock beside a local pool (``<folder>.lock``); remote pools rely on
        LanceDB's own commit conflict handling."""
        if not _is_local(self.uri):
            return nullcontext()
        return file_lock(Path(self.uri.removeprefix("file://")).absolute().as_posix() + ".lock")

    def _ensure_primary_key(self) -> None:
        names = self._tbl.schema.names
        missing = [c for c in (MERGE_KEY, "run_id", "sample_id", "image_vec") if c not in names]
        if missing:
            raise PoolError(
                f"table {self.table_name!r} at {self.uri!r} is not an ICD pool "
                f"(no column {missing[0]!r})"
            )
        meta = self._tbl.schema.field(MERGE_KEY).metadata or {}
        if not any(b"primary-key" in k for k in meta):
            self._tbl.set_unenforced_primary_key(MERGE_KEY)

    def _table_dim(self) -> int:
        field = self._tbl.schema.field("image_vec")
        return int(field.type.list_size)

    def _create(self, dim: int) -> None:
        if dim < 1:
            raise PoolError(f"vector dimension must be positive, got {dim}")
        # Serialised across processes: runs started at once on a fresh pool each find the
        # table the first one created instead of racing to create it.
        with self._creation_lock():
            try:
                self._tbl = self._open_table() or self._db.create_table(
                    self.table_name, schema=pool_schema(dim), mode="create", exist_ok=True
                )
            except Exception as e:
                raise PoolError(
                    f"cannot create pool table at {self.uri!r}: {_one_line(e)}"
                ) from None
            self.dim = self._table_dim()
            self._ensure_primary_key()
        if self.dim != dim:
            raise PoolError(
                f"pool {self.table_name!r} at {self.uri!r} holds {self.dim}-d vectors, not {dim}-d"
            )
        self._known_version = self._tbl.version

    # -- writing -------------------------------------------------------------------------

    def upsert(self, rows: Sequence[dict[str, Any]]) -> int:
        """Insert or replace ``rows`` (keyed by ``(run_id, sample_id)``) in one commit.

        Every row is validated before anything is written: a missing or unknown field, a
        vector of the wrong dimension or with NaN/inf values, or a key repeated within
        ``rows`` raises :class:`PoolError` (a ``ValueError``) and leaves the pool unchanged.
        Re-upserting the same rows never duplicates them. Returns the new LanceDB version
        (the current version, without a commit, when ``rows`` is empty).
        """
        with self._lock:
            if not rows:
                return self.version()
            dim = self.dim
            if dim is None:
                first = rows[0].get("image_vec") if isinstance(rows[0], dict) else None
                dim = int(np.asarray(first).size) if first is not None else 0
                if dim < 1:
                    raise PoolError("pool upsert rejected: row 0 has no usable 'image_vec'")
            table, batches = _to_arrow(rows, dim)
            if self._tbl is None:
                self._create(dim)
            try:
                result = (
                    self._tbl.merge_insert(MERGE_KEY)
                    .when_matched_update_all()
                    .when_not_matched_insert_all()
                    .execute(table)
                )
            except Exception as e:
                raise PoolError(f"pool upsert failed at {self.uri!r}: {_one_line(e)}") from None
            version = int(result.version)
            self._commits += 1
            foreign = version != self._known_version + 1
            for run_id, batch in batches.items():
                cache = self._caches.get(run_id)
                if cache is not None:
                    cache.add(batch)
            self._known_version = version
            if foreign:
                self._drop_stale_caches()
            return version

    def compact(self, prune_older_than: timedelta | None = None) -> int:
        """Merge small fragments (LanceDB ``optimize``) and return the new version.

        Old versions are kept (so every recorded chunk version stays checkout-able) unless
        ``prune_older_than`` is given: then versions older than that are removed.
        """
        with self._lock:
            if self._tbl is None:
                return 0
            self._check_foreign()
            keep = prune_older_than if prune_older_than is not None else _KEEP_VERSIONS
            try:
                self._tbl.optimize(cleanup_older_than=keep)
            except Exception as e:
                raise PoolError(f"pool compaction failed at {self.uri!r}: {_one_line(e)}") from None
            self._commits_at_compact = self._commits
            self._known_version = self._tbl.version
            return self._known_version

    def maybe_compact(self, every: int) -> bool:
        """Compact when ``every`` upserts have been committed through this handle since the
        last compaction. Returns True if it compacted. Compaction is maintenance: if it
        fails (e.g. it lost a commit race with another writer) a warning is logged and the
        next call tries again; the data is unaffected."""
        if every < 1 or self._commits - self._commits_at_compact < every:
            return False
        try:
            self.compact()
        except PoolError as e:
            log.warning("pool compaction skipped: %s", e)
            return False
        return True

    def tag(self, name: str, version: int) -> None:
        """Name a version (``checkout(name)`` then works; tags survive compaction)."""
        self._require_table().tags.create(name, version)

    # -- reading -------------------------------------------------------------------------

    def view(self, run_id: str, before_chunk: int | None = None) -> PoolView:
        """Rows of ``run_id`` with ``chunk < before_chunk`` (all rows if None), as a snapshot.

        Served from the run's cache (loaded from LanceDB on first use); the result is the
        same whatever order the rows were written in.
        """
        with self._lock:
            if self._tbl is None:
                self._tbl = self._open_table()
                if self._tbl is None:
                    return _empty_view(self.dim)
                self.dim = self._table_dim()
            self._check_foreign()
            cache = self._caches.get(run_id)
            if cache is None:
                cache = self._load_cache(run_id)
                self._caches[run_id] = cache
            return cache.view(before_chunk)

    def refresh(self) -> None:
        """Forget all cached vectors; the next view reloads from the table."""
        with self._lock:
            self._caches.clear()
            if self._tbl is not None:
                self._known_version = self._tbl.version

    def fetch(
        self, ids: Sequence[str], run_id: str, with_vectors: bool = False
    ) -> list[dict[str, Any]]:
        """Full rows (image bytes, question, label, votes, ...) of ``run_id``'s ``ids``, in the
        order of ``ids``. Vectors are left out unless ``with_vectors``. An id that is not in
        the pool raises ``KeyError``."""
        if not ids:
            return []
        tbl = self._require_table()
        columns = [
            f.name
            for f in tbl.schema
            if f.name != MERGE_KEY and (with_vectors or f.name not in VECTOR_FIELDS)
        ]
        wanted = list(dict.fromkeys(str(i) for i in ids))
        found: dict[str, dict[str, Any]] = {}
        for lo in range(0, len(wanted), _IN_LIST_BATCH):
            part = wanted[lo : lo + _IN_LIST_BATCH]
            keys = ", ".join(_sql_str(row_key(run_id, sid)) for sid in part)
            where = f"{MERGE_KEY} IN ({keys})"
            for row in tbl.search().where(where).select(columns).limit(None).to_arrow().to_pylist():
                found[row["sample_id"]] = row
        missing = [i for i in wanted if i not in found]
        if missing:
            raise KeyError(f"{len(missing)} id(s) not in pool run {run_id!r}, e.g. {missing[0]!r}")
        return [found[str(i)] for i in ids]

    def checkout(self, version: int | str, run_id: str | None = None) -> PoolView:
        """The pool table as it was at ``version`` (a number or a tag), read through a
        separate read-only handle; rows of ``run_id`` only if given. Rows are ordered by
        ``(run_id, chunk, stream_pos, sample_id)``; ``run_ids`` is filled."""
        self._require_table()
        try:
            old = self._db.open_table(self.table_name)
            old.checkout(version)
        except Exception as e:
            raise PoolError(f"cannot check out pool version {version!r}: {_one_line(e)}") from None
        query = old.search().select(["run_id", *_CACHE_COLUMNS]).limit(None)
        if run_id is not None:
            query = query.where(f"run_id = {_sql_str(run_id)}")
        t = query.to_arrow().sort_by(
            [
                ("run_id", "ascending"),
                ("chunk", "ascending"),
                ("stream_pos", "ascending"),
                ("sample_id", "ascending"),
            ]
        )
        dim = int(old.schema.field("image_vec").type.list_size)
        return PoolView(
            ids=np.array(t.column("sample_id").to_pylist(), dtype=object),
            image_vecs=_vectors(t.column("image_vec"), dim),
            label_vecs=_vectors(t.column("label_vec"), dim),
            labels=np.array(t.column("label").to_pylist(), dtype=object),
            chunk=t.column("chunk").to_numpy(),
            stream_pos=t.column("stream_pos").to_numpy(),
            run_ids=np.array(t.column("run_id").to_pylist(), dtype=object),
            version=int(old.version),
        )

    @property
    def table(self) -> Any:
        """The LanceDB table handle, for read-only queries (write through :meth:`upsert`)."""
        return self._require_table()

    def version(self) -> int:
        """The latest LanceDB version of the pool table (0 before it exists)."""
        return int(self._tbl.version) if self._tbl is not None else 0

    def versions(self) -> list[dict[str, Any]]:
        """Every kept version: ``{"version", "timestamp", "rows"}``, oldest first."""
        if self._tbl is None:
            return []
        out = []
        for v in self._tbl.list_versions():
            rows = v.get("metadata", {}).get("total_rows")
            out.append(
                {
                    "version": int(v["version"]),
                    "timestamp": v["timestamp"],
                    "rows": int(rows) if rows is not None else None,
                }
            )
        return sorted(out, key=lambda v: v["version"])

    def count(self, run_id: str | None = None) -> int:
        """Rows in the pool (of ``run_id`` only if given), as of the latest version."""
        if self._tbl is None:
            return 0
        if run_id is None:
            return int(self._tbl.count_rows())
        return int(self._tbl.count_rows(f"run_id = {_sql_str(run_id)}"))

    def fragment_count(self) -> int:
        """Data fragments in the latest version (compaction keeps this bounded)."""
        if self._tbl is None:
            return 0
        return int(self._tbl.stats()["fragment_stats"]["num_fragments"])

    def describe(self, run_id: str | None = None) -> dict[str, Any]:
        """A summary for inspection: size, per-run counts, label histogram, agreement
        statistics, versions and fragments (rows of ``run_id`` only, if given)."""
        if self._tbl is None:
            return {"uri": self.uri, "table": self.table_name, "rows": 0, "dim": self.dim}
        query = self._tbl.search().select(["run_id", "label", "agreement"]).limit(None)
        if run_id is not None:
            query = query.where(f"run_id = {_sql_str(run_id)}")
        t = query.to_arrow()
        agreement = np.array(
            [a for a in t.column("agreement").to_pylist() if a is not None], dtype=float
        )
        stats = self._tbl.stats()
        versions = self.versions()
        return {
            "uri": self.uri,
            "table": self.table_name,
            "rows": t.num_rows,
            "dim": self.dim,
            "bytes": int(stats["total_bytes"]),
            "runs": dict(Counter(t.column("run_id").to_pylist()).most_common()),
            "labels": dict(Counter(t.column("label").to_pylist()).most_common()),
            "agreement": {
                "mean": round(float(agreement.mean()), 4) if agreement.size else None,
                "min": float(agreement.min()) if agreement.size else None,
                "max": float(agreement.max()) if agreement.size else None,
            },
            "version": self.version(),
            "versions": len(versions),
            "first_version": versions[0]["version"] if versions else None,
            "fragments": int(stats["fragment_stats"]["num_fragments"]),
            "tags": sorted(self._tbl.tags.list()),
        }

    # -- internals -----------------------------------------------------------------------

    def _require_table(self) -> Any:
        if self._tbl is None:
            self._tbl = self._open_table()
            if self._tbl is None:
                raise PoolError(f"pool table {self.table_name!r} at {self.uri!r} is empty")
            self.dim = self._table_dim()
        return self._tbl

    def _load_cache(self, run_id: str) -> _RunCache:
        t = (
            self._tbl.search()
            .where(f"run_id = {_sql_str(run_id)}")
            .select(_CACHE_COLUMNS)
            .limit(None)
            .to_arrow()
        )
        return _RunCache.from_arrow(t, int(self.dim or 0))

    def _check_foreign(self) -> None:
        """If another handle committed since we last looked, reload what it changed."""
        if self._tbl is None:
            return
        latest = int(self._tbl.version)
        if latest != self._known_version:
            self._known_version = latest
            self._drop_stale_caches()

    def _drop_stale_caches(self) -> None:
        for run_id in list(self._caches):
            if self.count(run_id) != self._caches[run_id].n:
                del self._caches[run_id]


def inspect_pool(uri: str, run_id: str | None = None, table: str = DEFAULT_TABLE) -> dict[str, Any]:
    """:meth:`DemoPool.describe` of an existing pool (read-only; a missing pool raises
    :class:`PoolError` with a one-line message instead of creating one)."""
    return DemoPool(uri, table=table, must_exist=True).describe(run_id)


def _to_arrow(rows: Sequence[dict[str, Any]], dim: int) -> tuple[pa.Table, dict[str, dict]]:
    """Validate pool rows and build the Arrow table to write plus per-run cache batches."""
    allowed = set(REQUIRED_FIELDS) | set(OPTIONAL_FIELDS)
    cols: dict[str, list[Any]] = {name: [] for name in (*REQUIRED_FIELDS, *OPTIONAL_FIELDS)}
    vecs = {name: np.empty((len(rows), dim), dtype=np.float32) for name in VECTOR_FIELDS}
    seen: set[tuple[str, str]] = set()
    now = datetime.now(UTC)
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise PoolError(f"pool upsert rejected: row {i} is {type(row).__name__}, not a dict")
        where = f"row {i} (sample_id={row.get('sample_id')!r})"
        missing = [f for f in REQUIRED_FIELDS if row.get(f) is None]
        if missing:
            raise PoolError(f"pool upsert rejected: {where} is missing field {missing[0]!r}")
        unknown = sorted(set(row) - allowed)
        if unknown:
            raise PoolError(f"pool upsert rejected: {where} has unknown field {unknown[0]!r}")
        for name in ("sample_id", "run_id", "label"):
            if not isinstance(row[name], str) or (name != "label" and not row[name]):
                raise PoolError(f"pool upsert rejected: {where}: {name!r} must be a non-empty str")
        if "/" in row["run_id"]:
            raise PoolError(f"pool upsert rejected: {where}: run_id {row['run_id']!r} contains '/'")
        for name in ("chunk", "stream_pos"):
            v = row[name]
            if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 0:
                raise PoolError(f"pool upsert rejected: {where}: {name!r} must be an int >= 0")
        key = (row["run_id"], row["sample_id"])
        if key in seen:
            raise PoolError(f"pool upsert rejected: {where} appears twice in one upsert")
        seen.add(key)
        for name in VECTOR_FIELDS:
            try:
                v = np.asarray(row[name], dtype=np.float32)
            except (TypeError, ValueError):
                raise PoolError(f"pool upsert rejected: {where}: {name!r} is not numeric") from None
            if v.ndim != 1 or v.shape[0] != dim:
                raise PoolError(
                    f"pool upsert rejected: {where}: {name!r} has shape {v.shape}, "
                    f"the pool's vectors have dimension {dim}"
                )
            if not np.isfinite(v).all():
                raise PoolError(f"pool upsert rejected: {where}: {name!r} contains NaN or inf")
            vecs[name][i] = v
        for name in ("agreement", "uncertainty"):
            v = row.get(name)
            if v is not None and (not isinstance(v, int | float | np.number) or math.isnan(v)):
                raise PoolError(f"pool upsert rejected: {where}: {name!r} must be a number")
        image = row.get("image")
        if image is not None and not isinstance(image, bytes | bytearray | memoryview):
            raise PoolError(f"pool upsert rejected: {where}: 'image' must be bytes (PNG)")
        votes = row.get("votes")
        if votes is not None and (
            isinstance(votes, str) or not all(isinstance(x, str) for x in votes)
        ):
            raise PoolError(f"pool upsert rejected: {where}: 'votes' must be a list of str")
        created = row.get("created_at") or now
        if not isinstance(created, datetime):
            raise PoolError(f"pool upsert rejected: {where}: 'created_at' must be a datetime")
        for name in cols:
            if name in VECTOR_FIELDS:
                continue
            value = row.get(name)
            if name == "created_at":
                value = created if created.tzinfo else created.replace(tzinfo=UTC)
            elif name == "votes":
                value = list(votes) if votes is not None else []
            elif name == "image" and value is not None:
                value = bytes(value)
            elif name in ("chunk", "stream_pos"):
                value = int(value)
            elif name in ("agreement", "uncertainty") and value is not None:
                value = float(value)
            cols[name].append(value)

    schema = pool_schema(dim)
    arrays = {}
    for f in schema:
        if f.name == MERGE_KEY:
            keys = [row_key(r, i) for r, i in zip(cols["run_id"], cols["sample_id"], strict=True)]
            arrays[f.name] = pa.array(keys, type=f.type)
        elif f.name in VECTOR_FIELDS:
            arrays[f.name] = pa.FixedSizeListArray.from_arrays(pa.array(vecs[f.name].ravel()), dim)
        else:
            arrays[f.name] = pa.array(cols[f.name], type=f.type)
    table = pa.Table.from_arrays(list(arrays.values()), schema=schema)

    run_ids = np.array(cols["run_id"], dtype=object)
    batches: dict[str, dict[str, np.ndarray]] = {}
    for run_id in dict.fromkeys(cols["run_id"]):
        sel = np.flatnonzero(run_ids == run_id)
        batches[run_id] = {
            "ids": np.array(cols["sample_id"], dtype=object)[sel],
            "labels": np.array(cols["label"], dtype=object)[sel],
            "chunk": np.array(cols["chunk"], dtype=np.int64)[sel],
            "stream_pos": np.array(cols["stream_pos"], dtype=np.int64)[sel],
            "image_vecs": vecs["image_vec"][sel],
            "label_vecs": vecs["label_vec"][sel],
        }
    return table, batches
