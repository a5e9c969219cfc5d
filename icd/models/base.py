"""Protocols every model backend implements (hf, openai, oracle)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image
from typing_extensions import TypedDict  # pydantic reads it (typing.TypedDict needs 3.12)

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


class ServiceCalls(TypedDict, total=False):
    """A remote teacher's raw accounting of one call (:class:`icd.models.openai.OpenAIChat`);
    empty for an in-process teacher. Merge several with
    :func:`icd.models.openai.summarize_stats`."""

    requests: int  # HTTP attempts, whatever their outcome
    ok: int  # attempts that returned usable choices
    failures: int  # attempts that did not (status, timeout, connection, bad body)
    retries: int  # attempts made because an earlier one failed
    samples: int  # choices returned
    annotations: int  # samples annotated (successfully or not)
    errors: int  # samples finally marked teacher_error
    prompt_tokens: int  # as the server's `usage` reports them (0 where it does not)
    completion_tokens: int
    filtered: int  # finish_reason "content_filter"
    refused: int  # a refusal (the message's ``refusal`` text)
    empty: int  # no content
    truncated: int  # finish_reason "length"
    no_logprobs: int  # a student answer without log-probs
    latencies_ms: list[float]  # successful attempts


class Annotations(list[Annotation]):
    """A teacher call's annotations, one per sample in the samples' order, plus
    ``service``: the call's raw service accounting, filled by a remote teacher (HTTP
    attempts, failures, retries, latencies; see :func:`icd.models.openai.summarize_stats`)
    and empty for an in-process one."""

    def __init__(
        self, annotations: Iterable[Annotation] = (), service: ServiceCalls | None = None
    ) -> None:
        super().__init__(annotations)
        self.service: ServiceCalls = service.copy() if service else {}


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
