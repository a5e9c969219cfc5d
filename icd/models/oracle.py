"""The oracle teacher: ground-truth labels with an optional, reproducible noise rate.

It stands in for a real teacher in upper-bound runs and budget planning. Each vote is the
sample's true answer, or with probability ``noise`` a uniformly drawn *other* class. The
draw depends only on (seed, sample id, vote index), never on call order or batching, so a
resumed run sees exactly the same votes.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Sequence

import numpy as np

from icd.data.types import Sample
from icd.method.types import Generation, Prompt
from icd.models.base import Annotation, Annotations, Sampling


class OracleTeacher:
    """Teacher answering from ``sample.answers``; ``calls`` counts annotated samples."""

    revision = "oracle"

    def __init__(
        self,
        class_names: Sequence[str] | None,
        noise: float = 0.0,
        seed: int = 0,
        model_id: str = "oracle",
    ) -> None:
        if not 0.0 <= noise <= 1.0:
            raise ValueError(f"noise must be in [0, 1], got {noise}")
        self.class_names = list(dict.fromkeys(class_names or []))
        if noise > 0 and len(self.class_names) < 2:
            raise ValueError("a noisy oracle needs the task's class names (at least two)")
        self.noise = noise
        self.seed = seed
        self.model_id = model_id
        self.calls = 0

    @property
    def provenance(self) -> str:
        """What produced its labels, as recorded with each pool row: ``oracle(noise=0.1)``."""
        return provenance(self.noise)

    def annotate(
        self,
        samples: Sequence[Sample],
        prompts: Sequence[Prompt | None],
        sampling: Sampling,
    ) -> Annotations:
        """``sampling.n`` votes per sample (prompts, temperature, include_greedy and the
        call seed are ignored: the oracle's votes are fixed by its own seed)."""
        out = Annotations()
        for sample in samples:
            votes = [self.vote(sample, v) for v in range(sampling.n)]
            out.append(Annotation(generations=[_generation(v) for v in votes]))
        self.calls += len(samples)
        return out

    def vote(self, sample: Sample, index: int) -> str:
        """The ``index``-th vote for ``sample``: its true answer, or with probability
        ``noise`` another class drawn uniformly."""
        truth = _truth(sample)
        if self.noise <= 0:
            return truth
        key = f"{self.seed}|{sample.sample_id}|{index}".encode()
        rng = random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))
        if rng.random() >= self.noise:
            return truth
        others = [c for c in self.class_names if c != truth]
        return rng.choice(others)


def provenance(noise: float) -> str:
    """The provenance string of an oracle teacher with this noise rate."""
    return f"oracle(noise={noise:g})"


def _truth(sample: Sample) -> str:
    """The most common ground-truth answer (the first one on ties)."""
    if not sample.answers:
        raise ValueError(f"sample {sample.sample_id!r} has no ground-truth answer")
    return Counter(sample.answers).most_common(1)[0][0]


def _generation(text: str) -> Generation:
    n = max(1, len(text.split()))
    return Generation(
        text=text,
        token_logprobs=np.zeros(n, np.float32),
        token_entropy=np.zeros(n, np.float32),
        first_top2=(1.0, 0.0),
    )
