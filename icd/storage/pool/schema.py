"""The pool's row schema: the Arrow schema of the table and the validation of new rows.

A row is a :class:`PoolRow`: the fields of :data:`REQUIRED_FIELDS` and any of
:data:`OPTIONAL_FIELDS`. :func:`rows_to_arrow` checks every row before anything is
written and turns the rows into the Arrow table to merge plus, per run, the arrays the
in-memory selection index appends; a bad row raises :class:`PoolError` with a one-line
message naming the row and the field.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, NotRequired, TypedDict

import numpy as np
import numpy.typing as npt
import pyarrow as pa

MERGE_KEY = "key"
# Field metadata that makes a column the table's unenforced primary key, set at creation
# so the key is in place before the first write (same as set_unenforced_primary_key).
PRIMARY_KEY_META = {"lance-schema:unenforced-primary-key:position": "1"}
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
# Curation marks (icd.method.curation): the chunk whose commit took the row out of
# selection and why; null while the row is live. Set by DemoPool.mark, never by an upsert
# (an upsert writes them null). Tables made before curation lack them until first written.
CURATION_FIELDS = ("excluded_chunk", "excluded_reason")
CURATION_TYPES = {"excluded_chunk": pa.int64(), "excluded_reason": pa.string()}
_ALLOWED = frozenset(REQUIRED_FIELDS) | frozenset(OPTIONAL_FIELDS)


class PoolRow(TypedDict):
    """One demonstration as written to the pool (:func:`pool_schema`'s columns less the
    merge key, which is derived, and the curation marks, which only curation sets)."""

    sample_id: str
    run_id: str
    chunk: int
    stream_pos: int
    image_vec: npt.ArrayLike  # float vector of the pool's dimension
    label: str
    label_vec: npt.ArrayLike
    question: NotRequired[str | None]
    image: NotRequired[bytes | None]  # PNG
    votes: NotRequired[list[str] | None]
    agreement: NotRequired[float | None]
    uncertainty: NotRequired[float | None]
    teacher: NotRequired[str | None]
    created_at: NotRequired[datetime | None]  # None or missing: the time of the write


class _StoredRow(TypedDict):
    """A checked row's scalar columns as stored (defaults filled, types coerced)."""

    sample_id: str
    run_id: str
    label: str
    question: str | None
    teacher: str | None
    chunk: int
    stream_pos: int
    image: bytes | None
    votes: list[str]
    agreement: float | None
    uncertainty: float | None
    created_at: datetime


class PoolError(ValueError):
    """A pool that cannot be opened or a write that was rejected (one-line message)."""


def pool_schema(dim: int) -> pa.Schema:
    """The Arrow schema of the pool table for ``dim``-dimensional vectors."""
    vec = pa.list_(pa.float32(), dim)
    return pa.schema(
        [
            pa.field(MERGE_KEY, pa.string(), nullable=False, metadata=PRIMARY_KEY_META),
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
            *(pa.field(name, t) for name, t in CURATION_TYPES.items()),
        ]
    )


def row_key(run_id: str, sample_id: str) -> str:
    """The pool's primary key of a row."""
    return f"{run_id}/{sample_id}"


# -- field rules: (check, message when it fails), in the order they are applied ----------


def _nonempty_str(v: Any) -> bool:
    return isinstance(v, str) and bool(v)


def _count(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, int | np.integer) and bool(v >= 0)


def _number(v: Any) -> bool:
    return v is None or (isinstance(v, int | float | np.number) and not math.isnan(v))


def _str_list(v: Any) -> bool:
    return v is None or (not isinstance(v, str) and all(isinstance(x, str) for x in v))


def _bytes(v: Any) -> bool:
    return v is None or isinstance(v, bytes | bytearray | memoryview)


def _datetime(v: Any) -> bool:
    return not v or isinstance(v, datetime)  # a falsy value means "now"


_Rule = tuple[Callable[[Any], bool], str]
# Checked before the duplicate-key and vector checks (they identify the row).
_KEY_RULES: dict[str, _Rule] = {
    "sample_id": (_nonempty_str, "'sample_id' must be a non-empty str"),
    "run_id": (_nonempty_str, "'run_id' must be a non-empty str"),
    "label": (lambda v: isinstance(v, str), "'label' must be a non-empty str"),
    "chunk": (_count, "'chunk' must be an int >= 0"),
    "stream_pos": (_count, "'stream_pos' must be an int >= 0"),
}
_VALUE_RULES: dict[str, _Rule] = {
    "agreement": (_number, "'agreement' must be a number"),
    "uncertainty": (_number, "'uncertainty' must be a number"),
    "image": (_bytes, "'image' must be bytes (PNG)"),
    "votes": (_str_list, "'votes' must be a list of str"),
    "created_at": (_datetime, "'created_at' must be a datetime"),
}


def _vector(v: Any, name: str, dim: int) -> np.ndarray | str:
    """``v`` as a float32 vector of length ``dim``, or the reason it is not one."""
    try:
        vec = np.asarray(v, dtype=np.float32)
    except (TypeError, ValueError):
        return f"{name!r} is not numeric"
    if vec.ndim != 1 or vec.shape[0] != dim:
        return f"{name!r} has shape {vec.shape}, the pool's vectors have dimension {dim}"
    if not np.isfinite(vec).all():
        return f"{name!r} contains NaN or inf"
    return vec


def _check_row(i: int, row: Any, dim: int, seen: set[tuple[str, str]]) -> list[np.ndarray]:
    """Raise :class:`PoolError` for the first rule ``row`` breaks; return its vectors."""
    if not isinstance(row, dict):
        raise PoolError(f"pool upsert rejected: row {i} is {type(row).__name__}, not a dict")
    where = f"row {i} (sample_id={row.get('sample_id')!r})"

    def reject(reason: str) -> PoolError:
        return PoolError(f"pool upsert rejected: {where}{reason}")

    missing = [f for f in REQUIRED_FIELDS if row.get(f) is None]
    if missing:
        raise reject(f" is missing field {missing[0]!r}")
    unknown = sorted(set(row) - _ALLOWED)
    if unknown:
        raise reject(f" has unknown field {unknown[0]!r}")
    for name, (ok, message) in _KEY_RULES.items():
        if not ok(row[name]):
            raise reject(f": {message}")
        if name == "run_id" and "/" in row["run_id"]:
            raise reject(f": run_id {row['run_id']!r} contains '/'")
    key = (row["run_id"], row["sample_id"])
    if key in seen:
        raise reject(" appears twice in one upsert")
    seen.add(key)
    vectors = [_vector(row[name], name, dim) for name in VECTOR_FIELDS]
    for vec in vectors:
        if isinstance(vec, str):
            raise reject(f": {vec}")
    for name, (ok, message) in _VALUE_RULES.items():
        if not ok(row.get(name)):
            raise reject(f": {message}")
    return vectors  # type: ignore[return-value]


def _stored(row: PoolRow, now: datetime) -> _StoredRow:
    """The scalar columns of a checked row as stored (defaults filled, types coerced)."""
    created = row.get("created_at") or now
    image, votes = row.get("image"), row.get("votes")
    agreement, uncertainty = row.get("agreement"), row.get("uncertainty")
    return {
        "sample_id": row["sample_id"],
        "run_id": row["run_id"],
        "label": row["label"],
        "question": row.get("question"),
        "teacher": row.get("teacher"),
        "chunk": int(row["chunk"]),
        "stream_pos": int(row["stream_pos"]),
        "image": bytes(image) if image is not None else None,
        "votes": list(votes) if votes is not None else [],
        "agreement": float(agreement) if agreement is not None else None,
        "uncertainty": float(uncertainty) if uncertainty is not None else None,
        "created_at": created if created.tzinfo else created.replace(tzinfo=UTC),
    }


def rows_to_arrow(
    rows: Sequence[PoolRow], dim: int
) -> tuple[pa.Table, dict[str, dict[str, np.ndarray]]]:
    """Validate pool ``rows`` and build the Arrow table to write plus per-run index batches.

    Every row is checked first (see :class:`PoolError`); a failure names the row and the
    first rule it breaks. The batches map each run id to the arrays
    :meth:`icd.storage.pool.index.RunCache.add` takes (``ids``, ``labels``, ``chunk``,
    ``stream_pos``, ``image_vecs``, ``label_vecs``).
    """
    vecs = {name: np.empty((len(rows), dim), dtype=np.float32) for name in VECTOR_FIELDS}
    seen: set[tuple[str, str]] = set()
    now = datetime.now(UTC)
    stored = []
    for i, row in enumerate(rows):
        for name, vec in zip(VECTOR_FIELDS, _check_row(i, row, dim, seen), strict=True):
            vecs[name][i] = vec
        stored.append(_stored(row, now))
    cols: dict[str, list[object]] = {}
    for r in stored:
        for name, value in r.items():
            cols.setdefault(name, []).append(value)
    schema = pool_schema(dim)
    arrays = []
    for f in schema:
        if f.name == MERGE_KEY:
            keys = [row_key(r["run_id"], r["sample_id"]) for r in stored]
            arrays.append(pa.array(keys, type=f.type))
        elif f.name in CURATION_FIELDS:
            arrays.append(pa.nulls(len(rows), f.type))
        elif f.name in VECTOR_FIELDS:
            arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(vecs[f.name].ravel()), dim))
        else:
            arrays.append(pa.array(cols.get(f.name, []), type=f.type))
    table = pa.Table.from_arrays(arrays, schema=schema)

    run_ids = np.array(cols.get("run_id", []), dtype=object)
    batches: dict[str, dict[str, np.ndarray]] = {}
    for run_id in dict.fromkeys(r["run_id"] for r in stored):
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
