"""Protocols every model backend implements (hf, openai, oracle)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

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


@runtime_checkable
class Teacher(Protocol):
    """Labels samples with ``n`` answers each (sampled at ``temperature``; the greedy
    answer first when ``include_greedy``). A sample whose calls fail finally gets an
    :class:`Annotation` with ``error`` set; it never raises for one bad sample."""

    model_id: str
    revision: str

    def annotate(
        self,
        samples: Sequence[Sample],
        prompts: Sequence[Prompt],
        n: int,
        temperature: float,
        include_greedy: bool,
        seed: int,
    ) -> list[Annotation]: ...


@runtime_checkable
class Embedder(Protocol):
    """A dual encoder: images and texts in one space, rows L2-normalised float32."""

    model_id: str
    revision: str
    dim: int

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray: ...

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray: ...
