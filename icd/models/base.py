"""Protocols every model backend implements (hf, openai, oracle)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from icd.data.types import Sample
from icd.method.types import Generation, Prompt


@runtime_checkable
class Student(Protocol):
    """A VLM that answers prompts greedily, with token statistics."""

    model_id: str
    revision: str

    def generate(
        self, prompts: Sequence[Prompt], max_new_tokens: int | None = None
    ) -> list[Generation]:
        """One greedy answer per prompt, batched internally; order preserved."""
        ...


@dataclass
class Annotation:
    """A teacher's raw answers for one sample, or the reason it failed."""

    generations: list[Generation]
    error: str | None = None
    requests: int = 1
    retries: int = 0


class Annotations(list[Annotation]):
    """A teacher call's annotations, one per sample in the samples' order, plus
    ``service``: the call's raw service accounting, filled by a remote teacher (HTTP
    attempts, failures, retries, latencies; see :func:`icd.models.openai.summarize_stats`)
    and empty for an in-process one."""

    def __init__(
        self, annotations: Iterable[Annotation] = (), service: dict[str, Any] | None = None
    ) -> None:
        super().__init__(annotations)
        self.service: dict[str, Any] = dict(service or {})


@dataclass(frozen=True)
class Sampling:
    """How a teacher answers each sample: ``n`` answers, the greedy one first when
    ``include_greedy``, the others sampled at ``temperature`` with seeds derived from
    ``seed`` and the sample id (never from batching or call order)."""

    n: int
    temperature: float
    include_greedy: bool
    seed: int

    @property
    def n_sampled(self) -> int:
        """How many of the ``n`` answers are sampled (the rest is the greedy one)."""
        return self.n - 1 if self.include_greedy else self.n


@runtime_checkable
class Teacher(Protocol):
    """Labels samples with ``sampling.n`` answers each (see :class:`Sampling`). A sample whose calls fail
    finally gets an :class:`Annotation` with ``error`` set; it never raises for one bad
    sample. The result is an :class:`Annotations` (a list) carrying the call's service
    accounting."""

    model_id: str
    revision: str

    def annotate(
        self, samples: Sequence[Sample], prompts: Sequence[Prompt], sampling: Sampling
    ) -> Annotations: ...


@runtime_checkable
class Embedder(Protocol):
    """A dual encoder: images and texts in one space, rows L2-normalised float32."""

    model_id: str
    revision: str
    dim: int

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray: ...

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray: ...
