"""The stream's records: one sample, and one chunk of samples."""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image


@dataclass
class Sample:
    """One stream sample. ``image`` is decoded RGB, or None when ``skip_reason`` is set.

    ``answers`` holds the ground truth: the class name for classification (one entry),
    the human answers for VQA (usually ten).
    """

    sample_id: str
    stream_pos: int
    question: str
    answers: list[str]
    image: Image.Image | None = None
    image_bytes: bytes = b""
    skip_reason: str | None = None


@dataclass
class Chunk:
    """``chunk_size`` consecutive samples of the stream; the unit of caching, retry, resume."""

    index: int
    samples: list[Sample] = field(default_factory=list)

    @property
    def key(self) -> str:
        """Stable identity: chunk index plus its sample ids."""
        import hashlib

        h = hashlib.sha256("|".join(s.sample_id for s in self.samples).encode()).hexdigest()
        return f"{self.index}-{h[:16]}"

    @property
    def valid(self) -> list[Sample]:
        return [s for s in self.samples if s.skip_reason is None]
