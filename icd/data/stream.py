"""The benchmark stream: a dataset read in order, cut into chunks of decoded samples.

``open_stream`` resolves a :class:`~icd.config.DataConfig` to a registered
:class:`~icd.data.registry.DatasetSpec` and opens its source through ``datasets``:

- ``fixture:shapes`` builds (or finds) the procedural shapes parquet and reads it locally;
- ``parquet:<file|folder|glob>`` and ``imagefolder:<folder>`` are read as map-style
  datasets, so a stream order is a permutation of row indices and resuming at chunk ``k``
  reads only the rows of chunks ``k..``;
- ``hf:<id>`` is streamed (``streaming=True``); resuming skips the first rows without
  decoding them, and ``order_seed`` uses the library's seeded buffer shuffle.

Images are never decoded by ``datasets`` (the column is cast to ``Image(decode=False)``);
each sample's bytes go through ``icd.data.images.load_image``. A sample whose image does
not decode, whose question is empty or whose label is missing is kept, with ``image=None``
and ``skip_reason`` set, so every stream position appears in exactly one chunk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import itertools
import json
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TypedDict
from urllib.parse import parse_qsl

import numpy as np

from icd.config import DataConfig
from icd.data import images, revisions, shapes
from icd.data.registry import DatasetSpec, get_dataset, load_registry_file, readable_name
from icd.data.types import Chunk, DatasetInfo, Sample
from icd.errors import one_line

log = logging.getLogger(__name__)

_BATCH = 64  # rows fetched per read from a map-style dataset


class DatasetUnavailable(ValueError):
    """A dataset source that cannot be opened (one-line message naming it)."""


def fixtures_root() -> Path:
    """Where fixtures live: ``$ICD_FIXTURES`` or ``<cwd>/.icd/fixtures``."""
    return Path(os.environ.get("ICD_FIXTURES") or Path.cwd() / ".icd" / "fixtures").absolute()


def open_stream(
    cfg: DataConfig, root: Path | None = None, spec: DatasetSpec | None = None
) -> Stream:
    """Open the stream ``cfg`` describes.

    The dataset is ``spec`` if given, else the registry entry ``cfg.dataset``; ``cfg.source``
    and ``cfg.split`` override the entry's source and split, ``cfg.question_column`` its
    question column, ``cfg.revision`` its hub revision; ``cfg.registry`` names a YAML
    registry file whose entries come before the built-in ones. A hub source's revision is
    resolved to its commit here (:func:`icd.data.revisions.resolve_revision`), before
    anything is read. An unregistered name with a ``cfg.source`` is read as a plain
    classification set: columns ``image`` and ``label``, and the question from a ``question``
    column when the source has one (else "What is shown in the image?"). A registered
    dataset read from another source does not demand the columns that source may lack: its
    id and question columns are used when present (else ids are row positions and the
    question is the entry's fixed one), and an ``imagefolder`` source's label is its folder
    name. ``root`` is the fixture folder (default :func:`fixtures_root`). Raises
    ``UnknownDataset`` for an unknown name without a source, :class:`DatasetUnavailable`
    when the source cannot be opened and ``ValueError`` naming the column when a column
    the spec needs is missing.
    """
    optional: set[str] = set()
    if spec is None:
        if cfg.source is not None and cfg.dataset not in _registered(cfg.registry):
            spec = DatasetSpec(
                name=cfg.dataset,
                source=cfg.source,
                split=cfg.split or "train",
                label_column="label",
                question_column="question",
            )
            optional.add("question_column")
        else:
            spec = get_dataset(cfg.dataset, cfg.registry)
    overrides: _Overrides = {}
    if cfg.source is not None and cfg.source != spec.source:
        overrides["source"] = cfg.source
        optional.update(("id_column", "question_column"))
        if cfg.source.startswith("imagefolder:") and spec.task == "classification":
            overrides["label_column"] = "label"  # the folder names
    if cfg.split is not None and cfg.split != spec.split:
        overrides["split"] = cfg.split
    if cfg.revision is not None and cfg.revision != spec.revision:
        overrides["revision"] = cfg.revision
    if cfg.question_column is not None:
        overrides["question_column"] = cfg.question_column
        optional.discard("question_column")  # named explicitly: it must be there
    if overrides:
        spec = dataclasses.replace(spec, **overrides)
    return Stream(
        spec, limit=cfg.limit, order_seed=cfg.order_seed, root=root, optional=frozenset(optional)
    )


class _Overrides(TypedDict, total=False):
    """The :class:`DatasetSpec` fields a stream's config may replace."""

    source: str
    label_column: str
    split: str
    revision: str
    question_column: str


class _Dropped(TypedDict, total=False):
    """Optional columns a source lacks, dropped from the spec."""

    id_column: None
    question_column: None


# One dataset row as ``datasets`` gives it: column name -> cell (an image dict, a label,
# a list of answers...).
Row = Mapping[str, object]


def _cell(row: Row, column: str | None) -> object:
    """The row's value in ``column`` (None for no column or a missing cell)."""
    return row.get(column) if column is not None else None


def _registered(registry_file: str | None = None) -> set[str]:
    from icd.data.registry import DATASETS

    extra = load_registry_file(registry_file) if registry_file is not None else {}
    return {*DATASETS, *extra}


class Stream:
    """One pass over a dataset split, in a fixed (optionally shuffled) order.

    ``length`` is the number of samples the stream yields (``limit`` applied), or None when
    the source does not say. ``optional`` names column roles of ``spec`` (``id_column``,
    ``question_column``) that are dropped, instead of failing, when the source lacks them.
    ``class_names`` and ``synonyms`` are the closed label set and its accepted alternatives
    (None / empty for VQA and captioning, whose samples' ``answers`` are the human answers /
    the reference captions). ``chunks`` yields consecutive
    :class:`Chunk` objects; stream position ``p`` always lands in chunk ``p // chunk_size``.
    """

    def __init__(
        self,
        spec: DatasetSpec,
        limit: int | None = None,
        order_seed: int | None = None,
        root: Path | None = None,
        optional: frozenset[str] = frozenset(),
    ) -> None:
        self.spec = spec
        self._optional = optional
        self.limit = limit
        self.order_seed = order_seed
        self._root = Path(root) if root is not None else fixtures_root()
        self._digest: str | None = None
        self._files: list[str] = []
        self.revision: revisions.Revision | None = None
        if spec.kind == "hf":
            self._source: _TableSource | _IterSource = self._open_hf()
        else:
            self._source = self._open_local()
        self._check_columns(self._source.column_names)
        self._checked_row = self._source.column_names is not None
        self.class_names = self._class_names()
        self.synonyms = self._synonyms()

    # -- public -----------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def split(self) -> str:
        return self.spec.split

    @property
    def task(self) -> str:
        return self.spec.task

    @property
    def class_groups(self) -> dict[str, list[str]]:
        """Groups of classes reported apart (e.g. ``base`` / ``novel``); empty if none."""
        return {g: list(names) for g, names in self.spec.class_groups.items()}

    @property
    def length(self) -> int | None:
        """Samples this stream yields (``limit`` applied); None when unknown."""
        return self._source.length

    def num_chunks(self, chunk_size: int) -> int | None:
        """Chunks of ``chunk_size`` this stream yields; None when the length is unknown."""
        if self.length is None:
            return None
        return -(-self.length // chunk_size)

    def chunks(self, chunk_size: int, start_chunk: int = 0) -> Iterator[Chunk]:
        """Yield chunks ``start_chunk, start_chunk + 1, ...`` to the end of the stream.

        Chunk ``c`` holds stream positions ``c * chunk_size`` up to ``(c + 1) * chunk_size``
        (the last one may be shorter); every position appears exactly once, skipped samples
        included. Starting at ``start_chunk > 0`` does not decode the earlier samples, and
        for local sources does not read them.
        """
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if start_chunk < 0:
            raise ValueError(f"start_chunk must be >= 0, got {start_chunk}")
        index = start_chunk
        samples: list[Sample] = []
        for pos, row_index, row in self._source.rows(start_chunk * chunk_size):
            samples.append(self._sample(pos, row_index, row))
            if len(samples) == chunk_size:
                yield Chunk(index=index, samples=samples)
                index, samples = index + 1, []
        if samples:
            yield Chunk(index=index, samples=samples)

    def chunk(self, index: int, chunk_size: int) -> Chunk:
        """Chunk ``index`` alone; ``IndexError`` past the end of the stream."""
        for chunk in self.chunks(chunk_size, start_chunk=index):
            return chunk
        raise IndexError(f"chunk {index} is past the end of stream {self.name!r}")

    def dataset_info(self) -> DatasetInfo:
        """Lineage record: name, source, split, task, num_rows, digest, order_seed, limit,
        and for a hub source ``revision`` (the commit read, or the branch when it could not
        be resolved) and ``revision_status`` (``pinned``, ``resolved``, ``unresolved`` or
        ``local``)."""
        rev = self.revision
        return {
            "name": self.name,
            "source": self.spec.source,
            "revision": rev.effective if rev is not None else None,
            "revision_status": rev.status if rev is not None else None,
            "split": self.split,
            "task": self.task,
            "num_rows": self.length,
            "source_rows": self._source.total_rows,
            "num_classes": len(self.class_names) if self.class_names else None,
            "order_seed": self.order_seed,
            "limit": self.limit,
            "digest": self.digest,
        }

    @property
    def digest(self) -> str:
        """Stable hash of the source: file names, sizes and head/tail bytes for local data,
        the hub id, config, split and revision for a hub dataset (the resolved commit when
        there is one, so a branch that moved gives a new digest; an unresolved branch is
        keyed as ``<branch>?unresolved``)."""
        if self._digest is None:
            if self.spec.kind == "hf":
                rev = self.revision
                revision = (
                    self.spec.revision
                    if rev is None or rev.status != "unresolved"
                    else f"{rev.requested or revisions.DEFAULT_BRANCH}?unresolved"
                )
                key = json.dumps([self.spec.target, self.spec.config, self.split, revision])
                self._digest = hashlib.sha256(key.encode()).hexdigest()[:32]
            else:
                self._digest = _files_digest(self._files, self.split)
        return self._digest

    def __repr__(self) -> str:
        return (
            f"Stream({self.name!r}, source={self.spec.source!r}, split={self.split!r}, "
            f"length={self.length}, order_seed={self.order_seed})"
        )

    # -- opening ----------------------------------------------------------------

    def _open_local(self) -> _TableSource:
        import datasets

        spec = self.spec
        kind, target = spec.kind, spec.target
        cache_dir = None
        data_files: dict[str, list[str]] | None = None
        data_dir: str | None = None
        try:
            if kind == "fixture":
                folder = self._build_fixture(target)
                self._files = shapes.data_files(folder)
                cache_dir = str(self._root / ".hf-datasets-cache")
                builder, data_files = "parquet", {spec.split: self._files}
            elif kind == "parquet":
                self._files = _parquet_files(target)
                builder, data_files = "parquet", {spec.split: self._files}
            elif kind == "imagefolder":
                if not Path(target).is_dir():
                    raise DatasetUnavailable(f"imagefolder {target!r} is not a folder")
                self._files = sorted(str(p) for p in Path(target).rglob("*") if p.is_file())
                builder, data_dir = "imagefolder", target
            else:
                raise DatasetUnavailable(
                    f"dataset {spec.name!r}: unsupported source {spec.source!r}"
                )
            with _quiet():
                ds = datasets.load_dataset(
                    builder,
                    split=spec.split,
                    cache_dir=cache_dir,
                    data_files=data_files,
                    data_dir=data_dir,
                )
        except DatasetUnavailable:
            raise
        except Exception as e:  # datasets raises many types; report them in one line
            raise DatasetUnavailable(
                f"cannot open dataset {spec.name!r} from {spec.source!r} split {spec.split!r}: "
                f"{one_line(e)}"
            ) from None
        ds = _undecoded(ds, spec.image_column)
        return _TableSource(ds, limit=self.limit, order_seed=self.order_seed)

    def _build_fixture(self, target: str) -> Path:
        name, _, query = target.partition("?")
        if name != "shapes":
            raise DatasetUnavailable(f"unknown fixture {name!r} (known: shapes)")
        usage = "parameters look like fixture:shapes?n=200&seed=1&corrupt_every=50&size=64"
        try:
            pairs = parse_qsl(query, strict_parsing=bool(query))
        except ValueError:
            raise DatasetUnavailable(f"fixture {target!r}: {usage}") from None
        unknown = {k for k, _ in pairs} - {"n", "seed", "corrupt_every", "size"}
        if unknown:
            raise DatasetUnavailable(
                f"fixture {target!r}: unknown parameter(s) {', '.join(sorted(unknown))}; {usage}"
            )
        try:
            params = {k: int(v) for k, v in pairs}
        except ValueError:
            raise DatasetUnavailable(
                f"fixture {target!r}: values must be integers; {usage}"
            ) from None
        return shapes.build_shapes_dataset(self._root, **params)

    def _open_hf(self) -> _IterSource:
        import datasets

        self.revision = revisions.resolve_revision(self.spec.target, self.spec.revision)
        if self.revision.commit is not None:  # read the very commit the lineage records
            self.spec = dataclasses.replace(self.spec, revision=self.revision.commit)
        spec = self.spec
        try:
            with _quiet():
                ds = datasets.load_dataset(
                    spec.target,
                    name=spec.config,
                    split=spec.split,
                    streaming=True,
                    revision=spec.revision,
                )
        except Exception as e:
            if "scripts are no longer supported" in str(e).lower():
                raise DatasetUnavailable(
                    f"hub dataset {spec.target!r} at {self.revision.label()} is a loading "
                    f"script, which datasets >= 4 does not run: {revisions.SCRIPT_FIX}"
                ) from None
            raise DatasetUnavailable(
                f"cannot open hub dataset {spec.target!r} split {spec.split!r}: {one_line(e)}"
            ) from None
        ds = _undecoded(ds, spec.image_column)
        total = None
        splits = getattr(ds.info, "splits", None)
        if splits and spec.split in splits and splits[spec.split].num_examples:
            total = int(splits[spec.split].num_examples)
        return _IterSource(
            ds,
            total=total,
            limit=self.limit,
            order_seed=self.order_seed,
            buffer=spec.shuffle_buffer,
        )

    def _check_columns(self, present: list[str] | None) -> None:
        if present is None:  # a stream without declared features: checked on the first row
            return
        spec = self.spec
        dropped: _Dropped = {}
        if "id_column" in self._optional and spec.id_column not in (None, *present):
            dropped["id_column"] = None
        if "question_column" in self._optional and spec.question_column not in (None, *present):
            dropped["question_column"] = None
        if dropped:
            if "question_column" in dropped and not spec.question.strip():
                del dropped["question_column"]  # no fixed question to fall back on
            spec = self.spec = dataclasses.replace(spec, **dropped)
        wanted = {
            "image_column": spec.image_column,
            "question_column": spec.question_column,
            "label_column": spec.label_column if spec.task == "classification" else None,
            "answers_column": spec.answers_column if spec.task != "classification" else None,
            "id_column": spec.id_column,
        }
        for role, column in wanted.items():
            if column is not None and column not in present:
                raise ValueError(
                    f"dataset {spec.name!r} has no column {column!r} ({role}); "
                    f"columns: {', '.join(present)}"
                )

    def _class_names(self) -> list[str] | None:
        spec = self.spec
        if spec.task != "classification":
            return None
        if spec.class_names is not None:
            return list(spec.class_names)
        feature = (self._source.features or {}).get(spec.label_column)
        names = getattr(feature, "names", None)
        if names:
            return [self._readable(n) for n in names]
        if isinstance(self._source, _TableSource) and spec.label_column is not None:
            values = self._source.unique(spec.label_column)
            if values and all(isinstance(v, str) for v in values):
                return sorted({self._readable(v) for v in values})
        return None

    def _synonyms(self) -> dict[str, list[str]]:
        if not self.spec.synonyms:
            return {}
        if self.class_names is None:
            return {k: list(v) for k, v in self.spec.synonyms.items()}
        by_key = {_key(n): n for n in self.class_names}
        out: dict[str, list[str]] = {}
        for name, alts in self.spec.synonyms.items():
            match = by_key.get(_key(name))
            if match is None:
                log.warning("dataset %r: synonyms for unknown class %r ignored", self.name, name)
                continue
            out[match] = list(alts)
        return out

    def _readable(self, name: str) -> str:
        return readable_name(name) if self.spec.readable_names else name

    # -- samples ----------------------------------------------------------------

    def _sample_id(self, row_index: int | None, row: Row) -> str:
        spec = self.spec
        if spec.id_column is not None and row.get(spec.id_column) is not None:
            return str(row[spec.id_column])
        if row_index is not None:
            return f"{spec.name}:{spec.split}:{row_index}"
        # A hub stream does not tell the row index once shuffled, so (whatever the order)
        # a sample without an id column is named by its content.
        h = hashlib.sha256(_image_bytes(row.get(spec.image_column))[0] or b"")
        if spec.question_column is not None:
            h.update(str(row.get(spec.question_column)).encode())
        return f"{spec.name}:{spec.split}:h{h.hexdigest()[:16]}"

    def _sample(self, pos: int, row_index: int | None, row: Row) -> Sample:
        if not self._checked_row:
            self._check_columns(list(row))
            self._checked_row = True
        spec = self.spec
        sample_id = self._sample_id(row_index, row)

        raw_question = row.get(spec.question_column) if spec.question_column else spec.question
        question = spec.prompt.format(question=str(raw_question).strip()) if raw_question else ""
        answers = self._answers(row)
        data, problem = _image_bytes(row.get(spec.image_column))

        sample = Sample(
            sample_id=sample_id,
            stream_pos=pos,
            question=question,
            answers=answers,
            image_bytes=data,
        )
        if not answers:
            sample.skip_reason = "missing_label"
        elif raw_question is None or not str(raw_question).strip():
            sample.skip_reason = "empty_question"
        elif problem is not None:
            sample.skip_reason = f"bad_image: {problem}"
        else:
            sample.image, sample.skip_reason = _decode(data)
        return sample

    def _answers(self, row: Row) -> list[str]:
        spec = self.spec
        if spec.task != "classification":  # VQA answers, reference captions
            return _vqa_answers(_cell(row, spec.answers_column))
        value = _cell(row, spec.label_column)
        if value is None or isinstance(value, bool):
            return []
        if isinstance(value, (int, np.integer)):
            k = int(value)
            if k < 0:  # the hub convention for "no label" (e.g. unlabeled test splits)
                return []
            if self.class_names is None:
                return [str(k)]
            return [self.class_names[k]] if k < len(self.class_names) else []
        text = str(value).strip()
        return [self._readable(text)] if text else []


class _TableSource:
    """A map-style dataset read through a permutation of its row indices."""

    def __init__(self, ds: Any, limit: int | None, order_seed: int | None) -> None:
        self.ds = ds
        self.total_rows = len(ds)
        if order_seed is None:
            order = np.arange(self.total_rows)
        else:
            order = np.random.default_rng(order_seed).permutation(self.total_rows)
        self.order = order[:limit] if limit is not None else order

    @property
    def column_names(self) -> list[str]:
        return list(self.ds.column_names)

    @property
    def features(self) -> Any:
        return self.ds.features

    @property
    def length(self) -> int:
        return len(self.order)

    def unique(self, column: str) -> list[Any]:
        return list(self.ds.unique(column))

    def rows(self, start: int) -> Iterator[tuple[int, int, Row]]:
        """(stream position, row index, row) from ``start`` on; reads only those rows."""
        for a in range(start, len(self.order), _BATCH):
            idx = self.order[a : a + _BATCH].tolist()
            batch = self.ds[idx]
            columns = list(batch)
            for j, row_index in enumerate(idx):
                yield a + j, row_index, {c: batch[c][j] for c in columns}


class _IterSource:
    """A streamed (iterable) dataset: seeded buffer shuffle, ``skip`` to resume. The limit
    is applied while reading (``islice``): ``IterableDataset.take`` pulls one row past it."""

    def __init__(
        self, ds: Any, total: int | None, limit: int | None, order_seed: int | None, buffer: int
    ) -> None:
        if order_seed is not None:
            # Shard per parquet row group, so that shuffling the shard order mixes a
            # class-sorted file too; feed the buffer from one shard at a time (interleaving
            # shards uses threads whose shutdown costs seconds on every early stop).
            with contextlib.suppress(NotImplementedError):
                ds = ds.reshard()
            ds = ds.shuffle(seed=order_seed, buffer_size=buffer, max_buffer_input_shards=1)
        self.ds = ds
        self.limit = limit
        self.total_rows = total
        if limit is None:
            self.length = total
        elif total is None:
            self.length = None
        else:
            self.length = min(limit, total)

    @property
    def column_names(self) -> list[str] | None:
        names = self.ds.column_names
        return list(names) if names is not None else None

    @property
    def features(self) -> Any:
        return self.ds.features

    def rows(self, start: int) -> Iterator[tuple[int, None, Row]]:
        """(stream position, None, row) from ``start`` on, in one pass over the source: the
        first ``start`` rows are skipped once, undecoded. The row index is not reported: a
        buffer-shuffled stream does not know it, and ids must not depend on the order."""
        ds = self.ds.skip(start) if start else self.ds
        stop = None if self.limit is None else max(0, self.limit - start)
        for pos, row in enumerate(itertools.islice(ds, stop), start=start):
            yield pos, None, row


# -- helpers ------------------------------------------------------------------------


def _undecoded(ds: Any, image_column: str) -> Any:
    """Cast an ``Image`` column to ``Image(decode=False)`` so rows carry raw bytes."""
    from datasets import Image as ImageFeature

    features = ds.features
    if features is not None and isinstance(features.get(image_column), ImageFeature):
        ds = ds.cast_column(image_column, ImageFeature(decode=False))
    return ds


def _image_bytes(value: Any) -> tuple[bytes, str | None]:
    """Raw bytes of an image cell (``{bytes, path}`` dict, bytes, or a path), plus a problem
    description when there are none."""
    if value is None:
        return b"", "missing image"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value), None
    path = None
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"]), None
        path = value.get("path")
    elif isinstance(value, str):
        path = value
    if not path:
        return b"", "missing image"
    try:
        if os.path.exists(path):
            return Path(path).read_bytes(), None
        from datasets.utils.file_utils import xopen

        with xopen(path, "rb") as f:
            return f.read(), None
    except Exception as e:
        return b"", f"cannot read {path}: {one_line(e)}"


def _decode(data: bytes) -> tuple[Any, str | None]:
    """(RGB image, None), or (None, "bad_image: reason") when the bytes do not decode."""
    from PIL import Image

    try:
        return images.load_image(data), None
    except images.BadImage as e:
        return None, f"bad_image: {one_line(e)}"
    except (OSError, SyntaxError, EOFError, ValueError, Image.DecompressionBombError) as e:
        return None, f"bad_image: {type(e).__name__}: {one_line(e)}"


def _vqa_answers(value: Any) -> list[str]:
    """Human answers from a list of strings, a list of ``{"answer": ...}`` dicts (VQAv2),
    a dict of lists (``datasets``' columnar sequence form) or a single string."""
    if value is None:
        return []
    if isinstance(value, dict):
        value = value.get("answer", value.get("answers", []))
    if isinstance(value, str):
        value = [value]
    out = []
    for a in value:
        if isinstance(a, dict):
            a = a.get("answer")
        if a is not None and str(a).strip():
            out.append(str(a).strip())
    return out


def _parquet_files(target: str) -> list[str]:
    path = Path(target)
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*.parquet"))
    elif glob.has_magic(target):
        files = sorted(glob.glob(target, recursive=True))
    else:
        files = [target] if path.is_file() else []
    if not files:
        raise DatasetUnavailable(f"no parquet files match {target!r}")
    return files


def _files_digest(files: list[str], split: str) -> str:
    common = (
        os.path.commonpath(files) if len(files) > 1 else os.path.dirname(files[0]) if files else ""
    )
    return files_digest(files, common, salt=split)


def files_digest(files: list[str], root: str, salt: str = "") -> str:
    """sha256 over ``salt`` and (name relative to ``root``, size, first and last MiB) of each
    file: stable across copies of the same data, cheap for large files."""
    h = hashlib.sha256(salt.encode())
    for f in sorted(files):
        size = os.path.getsize(f)
        h.update(f"{os.path.relpath(f, root)}|{size}|".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), os.SEEK_END)
                h.update(fh.read())
    return h.hexdigest()[:32]


def _key(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").split())


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence ``datasets``' progress bars while a split is prepared."""
    from datasets.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()
