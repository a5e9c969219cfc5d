"""Records shared by the method and the model backends (plain data, no I/O)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypedDict

import numpy as np
from PIL import Image


@dataclass
class Prompt:
    """A chat in Hugging Face message format plus the images it references, in order.

    ``messages`` is a list of ``{"role": ..., "content": [{"type": "image"} |
    {"type": "text", "text": ...}]}``; the i-th ``{"type": "image"}`` entry refers to
    ``images[i]``. Demonstrations are earlier user/assistant turns; the query is the last
    user turn, and the model answers it.

    ``image_ids`` (empty, or one per image; None for an image without one) name each image
    stably across prompts (:func:`icd.data.images.image_id`): a server that caches processed
    images by a caller's id (vLLM's multimodal ``uuid``) reuses a repeated demo's.
    """

    messages: list[dict[str, Any]]
    images: list[Image.Image] = field(default_factory=list)
    image_ids: list[str | None] = field(default_factory=list)


@dataclass
class Generation:
    """One generated answer with the token statistics the uncertainty measures need.

    All statistics are taken from the model's real (unwarped, temperature-1) distribution.
    ``token_logprobs[t]`` is log p(chosen token t); ``token_entropy[t]`` the entropy (nats)
    of step t's full distribution; ``first_top2`` the two largest probabilities of the
    first step. Empty answers have empty arrays and ``first_top2 == (1.0, 0.0)``.
    ``prompt_tokens`` is the length of the prompt the answer was generated from, images'
    tokens included (0 where the backend does not say). ``error`` is set (and the answer
    empty) when a remote student's request finally failed: ``student_error: ...``.
    """

    text: str
    token_logprobs: np.ndarray
    token_entropy: np.ndarray
    first_top2: tuple[float, float] = (1.0, 0.0)
    prompt_tokens: int = 0
    error: str | None = None

    @property
    def seq_logprob(self) -> float:
        return float(np.sum(self.token_logprobs))


class PredictionRow(TypedDict):
    """One sample's prediction row: a row of the predictions table, whose schema
    (:data:`icd.storage.results.PREDICTION_SCHEMA`, ``NULLABLE``) is made from these fields — ``X | None``
    ones may be null ("str?" / "float?" in the contract), all others are required."""

    run_id: str
    mode: str
    dataset: str
    sample_id: str
    chunk: int
    stream_pos: int
    question: str
    answers: list[str]
    skip_reason: str | None
    zs_answer: str | None
    zs_uncertainty: float | None
    zs_prompt_tokens: int | None
    queried: bool
    teacher_votes: list[str]
    teacher_label: str | None
    agreement: float | None
    accepted: bool
    teacher_error: str | None
    demo_ids: list[str]
    demo_labels: list[str]
    demo_accuracy: float | None
    icl_answer: str | None
    icl_gated: bool | None  # the ICL gate kept the zero-shot answer (no second pass)
    icl_uncertainty: float | None
    icl_prompt_tokens: int | None
    student_error: str | None
    final_answer: str | None
    final_source: str | None  # one of icd.method.accounting.SOURCES
    score: float | None
    # What the same run's baselines would have scored on the sample: the student alone,
    # forwarding the teacher's label (else the zero-shot answer), the ICL answer.
    zs_score: float | None
    forward_score: float | None
    icl_score: float | None
