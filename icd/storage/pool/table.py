"""The pool's LanceDB table: durable storage of accepted teacher annotations.

One LanceDB table (default ``demos``) at the pool URI (a local folder by default, any
LanceDB URI works) holds the pool rows of every run that shares it. A row is identified
by ``(run_id, sample_id)``, stored as the single column ``key = "run_id/sample_id"``,
which is the table's (unenforced) primary key: writes are ``merge_insert`` upserts on it,
so re-adding a chunk never duplicates a row — also when two processes insert the same
rows at once (LanceDB detects that conflict only for a primary-key merge; a merge on a
composite or non-key column lets both inserts through). Each upsert is one LanceDB
version that can be checked out later ("the pool as it was after chunk c").

Selection never scans the table: it reads each run's in-memory index
(:mod:`icd.storage.pool.index`), loaded once from LanceDB and appended on every upsert.
LanceDB stays the source of truth: a new handle (a resumed run, another process) loads the
index from the table, and commits by other processes to the same run are detected and
reloaded. Rows are checked by :mod:`icd.storage.pool.schema` before anything is written.

Curation (``method.pool``: a cap with eviction, a label audit) never deletes a row: it
marks it (``excluded_chunk``, ``excluded_reason``) in a commit of its own (:meth:`DemoPool.mark`).
Deleting would make the latest version forget what earlier chunks saw: a run resumed after
a kill could no longer rebuild the pool its next chunk must see, ``icd pool inspect
--chunk`` would undercount, and the table could not say why a demo left. With marks, the
pool as chunk c saw it is "rows of chunks < c not curated before c" in any later version,
and the version recorded for chunk c (checked out, live rows only) is the same set.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, OrderedDict
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Any, NotRequired, TypedDict

import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from icd.errors import one_line
from icd.method.curation import EVICTION_REASONS, LABEL_AUDIT
from icd.storage.locks import file_lock
from icd.storage.pool.index import (
    CACHE_COLUMNS,
    LIVE,
    PoolView,
    RunCache,
    empty_view,
    view_from_arrow,
)
from icd.storage.pool.schema import (
    CURATION_FIELDS,
    CURATION_TYPES,
    MERGE_KEY,
    VECTOR_FIELDS,
    PoolError,
    PoolRow,
    pool_schema,
    row_key,
    rows_to_arrow,
)

log = logging.getLogger(__name__)

DEFAULT_TABLE = "demos"
# Versions are kept by compaction unless asked otherwise: every chunk's commit stays
# checkout-able (a run's manifest maps chunk -> version).
_KEEP_VERSIONS = timedelta(days=365 * 100)
_IN_LIST_BATCH = 512
# Rows :meth:`DemoPool.fetch` keeps in memory (image bytes counted): a demo shown again in
# a later chunk is not read from LanceDB again.
ROW_CACHE_BYTES = 128 * 2**20


def _sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


class PoolVersion(TypedDict):
    """One kept version of the pool table."""

    version: int
    timestamp: Any  # as LanceDB lists it (a datetime)
    rows: int | None


class AgreementStats(TypedDict):
    mean: float | None
    min: float | None
    max: float | None


class PoolSummary(TypedDict):
    """:meth:`DemoPool.describe`: ``uri``, ``table``, ``rows`` and ``dim`` only for a pool
    without a table yet."""

    uri: str
    table: str
    rows: int
    dim: int | None
    live: NotRequired[int]
    evicted: NotRequired[int]
    excluded: NotRequired[int]
    bytes: NotRequired[int]
    runs: NotRequired[dict[str, int]]
    labels: NotRequired[dict[str, int]]
    agreement: NotRequired[AgreementStats]
    version: NotRequired[int]
    versions: NotRequired[int]
    first_version: NotRequired[int | None]
    fragments: NotRequired[int]
    tags: NotRequired[list[str]]


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
        self._caches: dict[str, RunCache] = {}
        self._rows: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()
        self._row_bytes = 0
        self._rows_lock = threading.Lock()
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
            raise PoolError(f"cannot open pool at {self.uri!r}: {one_line(e)}") from None
        if self._tbl is None:
            if must_exist:
                raise PoolError(f"no pool table {table!r} at {self.uri!r}")
            self.dim = dim
            if dim is not None:
                self._create(dim)
        else:
            with self._creation_lock():
                self._ensure_primary_key()
                if not must_exist:  # a writer brings a table made before curation up to date
                    self._ensure_curation_columns()
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

    def _ensure_curation_columns(self) -> None:
        """Add the curation columns (all null: every row live) to a table made before them,
        as one commit. Readers never need this: a table without them is all live."""
        missing = [n for n in CURATION_FIELDS if n not in self._tbl.schema.names]
        if not missing:
            return
        try:
            self._tbl.add_columns(pa.schema([pa.field(n, CURATION_TYPES[n]) for n in missing]))
        except Exception as e:
            self._tbl.checkout_latest()
            if any(n not in self._tbl.schema.names for n in missing):  # not another writer's
                raise PoolError(
                    f"cannot add curation columns to pool at {self.uri!r}: {one_line(e)}"
                ) from None

    def _curated(self, tbl: Any) -> bool:
        """Whether ``tbl`` (a handle or a checked-out version) has the curation columns."""
        return "excluded_chunk" in tbl.schema.names

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
                    f"cannot create pool table at {self.uri!r}: {one_line(e)}"
                ) from None
            self.dim = self._table_dim()
            self._ensure_primary_key()
        if self.dim != dim:
            raise PoolError(
                f"pool {self.table_name!r} at {self.uri!r} holds {self.dim}-d vectors, not {dim}-d"
            )
        self._known_version = self._tbl.version

    # -- writing -------------------------------------------------------------------------

    def upsert(self, rows: Sequence[PoolRow]) -> int:
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
            table, batches = rows_to_arrow(rows, dim)
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
                raise PoolError(f"pool upsert failed at {self.uri!r}: {one_line(e)}") from None
            version = int(result.version)
            self._commits += 1
            foreign = version != self._known_version + 1
            # the rows as fetch() reads them back: the next chunks' demos come from memory
            readable = [n for n in table.column_names if n != MERGE_KEY and n not in VECTOR_FIELDS]
            for row in table.select(readable).to_pylist():
                self._remember_row((str(row["run_id"]), str(row["sample_id"])), row)
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
                raise PoolError(f"pool compaction failed at {self.uri!r}: {one_line(e)}") from None
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

    # -- reading -------------------------------------------------------------------------

    def view(
        self, run_id: str, before_chunk: int | None = None, *, curated_before: int | None = None
    ) -> PoolView:
        """Live rows of ``run_id`` with ``chunk < before_chunk`` (all rows if None), as a
        snapshot: the pool as chunk ``before_chunk`` saw it. Rows curated by a chunk before
        ``curated_before`` (default ``before_chunk``; with both None, every curated row) are
        left out, so ``view(r, c + 1, curated_before=c)`` is chunk c's pool after its
        admissions, before its own curation.

        Served from the run's cache (loaded from LanceDB on first use); the result is the
        same whatever order the rows were written in.
        """
        with self._lock:
            if self._tbl is None:
                self._tbl = self._open_table()
                if self._tbl is None:
                    return empty_view(self.dim)
                self.dim = self._table_dim()
            self._check_foreign()
            return self._cache(run_id).view(before_chunk, curated_before=curated_before)

    def _cache(self, run_id: str) -> RunCache:
        cache = self._caches.get(run_id)
        if cache is None:
            cache = self._load_cache(run_id)
            self._caches[run_id] = cache
        return cache

    def mark(self, run_id: str, *, chunk: int, reasons: dict[str, str]) -> int:
        """Record chunk ``chunk``'s curation of ``run_id``: the rows of ``reasons`` (sample
        id -> reason) leave selection at ``chunk``; rows an earlier attempt of the same chunk
        (or a later chunk) marked that are not in ``reasons`` return to it. One commit per
        reason that changes something (none when nothing changes); returns the latest
        version. Marking again with the same ``reasons`` changes nothing."""
        with self._lock:
            tbl = self._require_table()
            self._check_foreign()
            if not self._curated(tbl):
                with self._creation_lock():
                    self._ensure_curation_columns()
            cache = self._cache(run_id)
            unknown = [sid for sid in reasons if sid not in cache.index]
            if unknown:
                raise PoolError(f"cannot curate {unknown[0]!r}: not in pool run {run_id!r}")
            marks = cache.excluded
            undo = [
                str(sid)
                for sid, at in zip(cache.ids[: cache.n], marks[: cache.n], strict=True)
                if chunk <= at < LIVE and sid not in reasons
            ]
            by_reason: dict[str, list[str]] = {}
            for sid, reason in sorted(reasons.items()):
                if marks[cache.index[sid]] != chunk:
                    by_reason.setdefault(reason, []).append(sid)
            start = self.version()
            commits = 0
            try:
                for reason, ids in by_reason.items():
                    values = {"excluded_chunk": int(chunk), "excluded_reason": reason}
                    tbl.update(where=self._keys_where(run_id, ids), values=values)
                    commits += 1
                if undo:
                    nulls = {"excluded_chunk": "NULL", "excluded_reason": "NULL"}
                    tbl.update(where=self._keys_where(run_id, undo), values_sql=nulls)
                    commits += 1
            except Exception as e:
                self._caches.pop(run_id, None)  # reload what was written from the table
                raise PoolError(f"pool curation failed at {self.uri!r}: {one_line(e)}") from None
            cache.mark(
                {
                    **{sid: chunk for ids in by_reason.values() for sid in ids},
                    **dict.fromkeys(undo, LIVE),
                }
            )
            self._commits += commits
            latest = self.version()
            if latest != start + commits:
                self._drop_stale_caches()
            self._known_version = latest
            return latest

    @staticmethod
    def _keys_where(run_id: str, ids: Sequence[str]) -> str:
        return f"{MERGE_KEY} IN ({', '.join(_sql_str(row_key(run_id, s)) for s in ids)})"

    def fetch(
        self, ids: Sequence[str], run_id: str, with_vectors: bool = False
    ) -> list[dict[str, Any]]:
        """Full rows (image bytes, question, label, votes, ...) of ``run_id``'s ``ids``, in the
        order of ``ids``. Vectors are left out unless ``with_vectors``; rows without them are
        kept in memory (up to ``ROW_CACHE_BYTES`` of images, dropped when the rows change),
        so a demo shown again is not read again. An id that is not in the pool raises
        ``KeyError``."""
        if not ids:
            return []
        wanted = list(dict.fromkeys(str(i) for i in ids))
        found: dict[str, dict[str, Any]] = {}
        if not with_vectors:  # rows without vectors are served from memory when held
            with self._rows_lock:  # not the pool's lock: a commit may be under way
                for sid in wanted:
                    row = self._rows.get((run_id, sid))
                    if row is not None:
                        self._rows.move_to_end((run_id, sid))
                        found[sid] = row
            wanted = [sid for sid in wanted if sid not in found]
        if wanted:  # read from LanceDB (its schema, too, costs a lookup)
            self._read_rows(wanted, run_id, found, with_vectors=with_vectors)
        missing = [i for i in wanted if i not in found]
        if missing:
            raise KeyError(f"{len(missing)} id(s) not in pool run {run_id!r}, e.g. {missing[0]!r}")
        if not with_vectors:
            for sid in wanted:
                self._remember_row((run_id, sid), found[sid])
        return [dict(found[str(i)]) for i in ids]

    def _read_rows(
        self,
        wanted: list[str],
        run_id: str,
        found: dict[str, dict[str, Any]],
        *,
        with_vectors: bool,
    ) -> None:
        tbl = self._require_table()
        columns = [
            f.name
            for f in tbl.schema
            if f.name != MERGE_KEY and (with_vectors or f.name not in VECTOR_FIELDS)
        ]
        for lo in range(0, len(wanted), _IN_LIST_BATCH):
            part = wanted[lo : lo + _IN_LIST_BATCH]
            keys = ", ".join(_sql_str(row_key(run_id, sid)) for sid in part)
            where = f"{MERGE_KEY} IN ({keys})"
            for row in tbl.search().where(where).select(columns).limit(None).to_arrow().to_pylist():
                found[row["sample_id"]] = row

    def _remember_row(self, key: tuple[str, str], row: dict[str, Any]) -> None:
        with self._rows_lock:
            old = self._rows.pop(key, None)
            if old is not None:
                self._row_bytes -= len(old.get("image") or b"")
            self._rows[key] = row
            self._row_bytes += len(row.get("image") or b"")
            while self._row_bytes > ROW_CACHE_BYTES and self._rows:
                _, old = self._rows.popitem(last=False)
                self._row_bytes -= len(old.get("image") or b"")

    def checkout(self, version: int | str, run_id: str | None = None) -> PoolView:
        """The pool table as it was at ``version`` (a number or a tag), read through a
        separate read-only handle: its live rows (curated ones left out), of ``run_id``
        only if given. Rows are ordered by
        ``(run_id, chunk, stream_pos, sample_id)``; ``run_ids`` is filled."""
        self._require_table()
        try:
            old = self._db.open_table(self.table_name)
            old.checkout(version)
        except Exception as e:
            raise PoolError(f"cannot check out pool version {version!r}: {one_line(e)}") from None
        query = old.search().select(["run_id", *CACHE_COLUMNS]).limit(None)
        where = [] if run_id is None else [f"run_id = {_sql_str(run_id)}"]
        if self._curated(old):
            where.append("excluded_chunk IS NULL")
        if where:
            query = query.where(" AND ".join(where))
        t = query.to_arrow().sort_by(
            [
                ("run_id", "ascending"),
                ("chunk", "ascending"),
                ("stream_pos", "ascending"),
                ("sample_id", "ascending"),
            ]
        )
        dim = int(old.schema.field("image_vec").type.list_size)
        return view_from_arrow(t, dim, int(old.version))

    @property
    def table(self) -> Any:
        """The LanceDB table handle, for read-only queries (write through :meth:`upsert`)."""
        return self._require_table()

    def version(self) -> int:
        """The latest LanceDB version of the pool table (0 before it exists)."""
        return int(self._tbl.version) if self._tbl is not None else 0

    def versions(self) -> list[PoolVersion]:
        """Every kept version: ``{"version", "timestamp", "rows"}``, oldest first."""
        if self._tbl is None:
            return []
        out: list[PoolVersion] = []
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

    def count(self, run_id: str | None = None, *, live: bool = False) -> int:
        """Rows in the pool (of ``run_id`` only if given), as of the latest version; with
        ``live``, only those left for selection (not curated)."""
        if self._tbl is None:
            return 0
        where = [] if run_id is None else [f"run_id = {_sql_str(run_id)}"]
        if live and self._curated(self._tbl):
            where.append("excluded_chunk IS NULL")
        if not where:
            return int(self._tbl.count_rows())
        return int(self._tbl.count_rows(" AND ".join(where)))

    def curated(self, run_id: str) -> int:
        """Rows of ``run_id`` curated out of selection, as of the latest version."""
        if self._tbl is None or not self._curated(self._tbl):
            return 0
        where = f"run_id = {_sql_str(run_id)} AND excluded_chunk IS NOT NULL"
        return int(self._tbl.count_rows(where))

    def fragment_count(self) -> int:
        """Data fragments in the latest version (compaction keeps this bounded)."""
        if self._tbl is None:
            return 0
        return int(self._tbl.stats()["fragment_stats"]["num_fragments"])

    def describe(
        self, run_id: str | None = None, *, through_chunk: int | None = None
    ) -> PoolSummary:
        """A summary for inspection: size, per-run counts, label histogram, agreement
        statistics, versions and fragments (rows of ``run_id`` only, if given).

        ``rows`` counts every stored row; ``live`` those left for selection, which the
        label histogram and agreement statistics describe; ``evicted`` and ``excluded``
        those curation took out (for the cap, by the label audit; see
        :mod:`icd.method.curation`). With ``through_chunk=c`` the rows counted are those
        added by chunks ``0..c`` and curation by chunks ``0..c``: a run's pool as its chunk
        ``c+1`` saw it (upserts are idempotent, so a row's ``chunk`` is the chunk that
        admitted it). Versions and fragments stay the latest.
        """
        if self._tbl is None:
            return {"uri": self.uri, "table": self.table_name, "rows": 0, "dim": self.dim}
        where = []
        if run_id is not None:
            where.append(f"run_id = {_sql_str(run_id)}")
        if through_chunk is not None:
            where.append(f"chunk <= {int(through_chunk)}")
        marks = ["excluded_chunk", "excluded_reason"] if self._curated(self._tbl) else []
        query = self._tbl.search().select(["run_id", "label", "agreement", *marks]).limit(None)
        if where:
            query = query.where(" AND ".join(where))
        stored = query.to_arrow()
        t, reasons = stored, Counter[str]()
        if marks:
            at = pc.fill_null(stored.column("excluded_chunk"), LIVE)
            out = pc.less_equal(at, LIVE - 1 if through_chunk is None else int(through_chunk))
            t = stored.filter(pc.invert(out))
            reasons = Counter(stored.filter(out).column("excluded_reason").to_pylist())
        agreement = np.array(
            [a for a in t.column("agreement").to_pylist() if a is not None], dtype=float
        )
        stats = self._tbl.stats()
        versions = self.versions()
        return {
            "uri": self.uri,
            "table": self.table_name,
            "rows": stored.num_rows,
            "live": t.num_rows,
            "evicted": sum(n for r, n in reasons.items() if r in EVICTION_REASONS),
            "excluded": reasons.get(LABEL_AUDIT, 0),
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

    def _load_cache(self, run_id: str) -> RunCache:
        marks = ["excluded_chunk"] if self._curated(self._tbl) else []
        t = (
            self._tbl.search()
            .where(f"run_id = {_sql_str(run_id)}")
            .select([*CACHE_COLUMNS, *marks])
            .limit(None)
            .to_arrow()
        )
        return RunCache.from_arrow(t, int(self.dim or 0))

    def _check_foreign(self) -> None:
        """If another handle committed since we last looked, reload what it changed."""
        if self._tbl is None:
            return
        latest = int(self._tbl.version)
        if latest != self._known_version:
            self._known_version = latest
            self._drop_stale_caches()

    def _drop_stale_caches(self) -> None:
        with self._rows_lock:  # another handle wrote: rows may have changed
            self._rows.clear()
            self._row_bytes = 0
        for run_id in list(self._caches):
            cache = self._caches[run_id]
            if self.count(run_id) != cache.n or self.curated(run_id) != cache.marked():
                del self._caches[run_id]


def inspect_pool(
    uri: str,
    run_id: str | None = None,
    table: str = DEFAULT_TABLE,
    *,
    through_chunk: int | None = None,
) -> PoolSummary:
    """:meth:`DemoPool.describe` of an existing pool (read-only; a missing pool raises
    :class:`PoolError` with a one-line message instead of creating one)."""
    pool = DemoPool(uri, table=table, must_exist=True)
    return pool.describe(run_id, through_chunk=through_chunk)
