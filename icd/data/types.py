"""The stream's records: one sample, and one chunk of samples."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TypedDict

from PIL import Image


@dataclass
class Sample:
    """One stream sample. ``image`` is decoded RGB, or None when ``skip_reason`` is set.

    ``answers`` holds the ground truth: the class name for classification (one entry),
    the human answers for VQA (usually ten), the reference captions for captioning.
    """

    sample_id: str
    stream_pos: int
    question: str
    answers: list[str]
    image: Image.Image | None = None  # decoded; None only for a skipped sample
    image_bytes: bytes = b""
    skip_reason: str | None = None


@dataclass
class Chunk:
    """``chunk_size`` consecutive samples of the stream; the unit of caching, retry, resume."""

    index: int
    samples: list[Sample] = field(default_factory=list)

    @cached_property
    def key(self) -> str:
        """Content identity, the chunk's cache key: a digest of every sample's id, image
        bytes, question, ground-truth answers and skip reason, in stream order. It never
        depends on row positions or object identity, so any change to the data, however
        small, gives a new key, and the same samples give the same key in any run."""
        return content_digest(self.samples)

    @property
    def valid(self) -> list[Sample]:
        return [s for s in self.samples if s.skip_reason is None]


class DatasetInfo(TypedDict):
    """A stream's lineage record (:meth:`icd.data.stream.Stream.dataset_info`), logged as
    the run's input dataset."""

    name: str
    source: str
    revision: str | None  # a hub source's commit read (or branch when unresolved)
    revision_status: str | None  # pinned, resolved, unresolved or local
    split: str
    task: str
    num_rows: int | None
    source_rows: int | None
    num_classes: int | None
    order_seed: int | None
    limit: int | None
    digest: str


def content_digest(samples: Sequence[Sample]) -> str:
    """sha256 (32 hex digits) over each sample's id, image bytes, question, answers and
    skip reason; every field is length-prefixed, so no two different chunks collide by
    moving bytes between fields."""
    h = hashlib.sha256()

    def put(data: bytes) -> None:
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)

    for s in samples:
        put(s.sample_id.encode())
        put(s.image_bytes)
        put(s.question.encode())
        put("\x1f".join(s.answers).encode())
        put((s.skip_reason or "").encode())
    return h.hexdigest()[:32]
