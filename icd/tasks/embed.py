"""Stage ``embed``: the image embeddings of a chunk's valid samples (pool-independent, so
it may run ahead of the current chunk)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import numpy as np
from PIL import Image

from icd.data.types import Chunk
from icd.models import load_embedder
from icd.tasks.base import MODEL_RETRIES, stage, stage_cache
from icd.tasks.context import RunContext
from icd.tasks.runner import Pending, Runner

COUNTERS: tuple[str, ...] = ()


@dataclass(frozen=True)
class Embedded:
    image_vecs: np.ndarray  # rows in ``chunk.valid`` order


@stage("embed", cache_policy=stage_cache("models.embedder"), **MODEL_RETRIES)
def embed(*, ctx: RunContext, chunk: Chunk) -> Embedded:
    """Image embeddings of the chunk's valid samples, rows in ``chunk.valid`` order."""
    model = load_embedder(ctx.cfg.models.embedder)
    images = [cast(Image.Image, s.image) for s in chunk.valid]  # valid: decoded
    vecs = model.embed_images(images) if images else np.zeros((0, model.dim), np.float32)
    return Embedded(vecs)


def submit(runner: Runner, ctx: RunContext, *, chunk: Chunk) -> Pending[Embedded]:
    """Start the chunk's embeddings (ahead, when lookahead is on)."""
    return runner.ahead(embed, ctx=ctx, chunk=chunk)


def collect(runner: Runner, *, pending: Pending[Embedded]) -> np.ndarray:
    """Wait for the chunk's embeddings: rows in ``chunk.valid`` order."""
    return runner.wait(pending).value.image_vecs
