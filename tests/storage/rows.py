"""Deterministic pool rows for the storage tests (importable by spawned writer processes)."""

from __future__ import annotations

from typing import Any

import numpy as np

from icd.storage.pool import DemoPool

DIM = 16
CHUNK = 8


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def chunk_rows(run_id: str, chunk: int, n: int = CHUNK, seed: int | None = None) -> list[dict]:
    """Rows of one chunk; the same arguments give the same rows."""
    rng = np.random.default_rng(seed if seed is not None else chunk)
    img, txt = unit(rng, n), unit(rng, n)
    return [
        {
            "sample_id": f"c{chunk:03d}-{i:02d}",
            "run_id": run_id,
            "chunk": chunk,
            "stream_pos": chunk * 100 + i,
            "question": "What shape is shown?",
            "image": f"png-{chunk}-{i}".encode(),
            "image_vec": img[i],
            "label": f"label{(chunk + i) % 3}",
            "label_vec": txt[i],
            "votes": ["a", "a", "b"],
            "agreement": 0.66,
            "uncertainty": 1.5,
            "teacher": "oracle",
        }
        for i in range(n)
    ]


def ids_of(rows: list[dict]) -> list[str]:
    return [r["sample_id"] for r in rows]


def write_chunks(
    uri: str, run_id: str, chunks: list[int], shared: int, barrier: Any = None
) -> None:
    """Upsert ``chunks`` one commit each, re-upserting chunk ``shared`` after every one
    (after waiting at ``barrier`` so concurrent writers really overlap)."""
    pool = DemoPool(uri)
    if barrier is not None:
        barrier.wait(60)
    for c in chunks:
        pool.upsert(chunk_rows(run_id, c))
        pool.upsert(chunk_rows(run_id, shared))
