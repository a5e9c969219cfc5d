"""Synthetic prediction frames and PNG checks shared by the report tests."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# The CONTRACTS.md predictions table.
PREDICTION_COLUMNS: dict[str, pl.DataType] = {
    "run_id": pl.String(),
    "mode": pl.String(),
    "dataset": pl.String(),
    "sample_id": pl.String(),
    "chunk": pl.Int64(),
    "stream_pos": pl.Int64(),
    "question": pl.String(),
    "answers": pl.List(pl.String()),
    "skip_reason": pl.String(),
    "zs_answer": pl.String(),
    "zs_uncertainty": pl.Float64(),
    "queried": pl.Boolean(),
    "teacher_votes": pl.List(pl.String()),
    "teacher_label": pl.String(),
    "agreement": pl.Float64(),
    "accepted": pl.Boolean(),
    "teacher_error": pl.String(),
    "demo_ids": pl.List(pl.String()),
    "demo_labels": pl.List(pl.String()),
    "demo_accuracy": pl.Float64(),
    "icl_answer": pl.String(),
    "icl_uncertainty": pl.Float64(),
    "final_answer": pl.String(),
    "final_source": pl.String(),
    "score": pl.Float64(),
}

CLASSES = ["red circle", "blue square", "green triangle", "yellow star"]


def make_predictions(
    run_id: str = "run-a",
    n: int = 96,
    chunk_size: int = 32,
    seed: int = 0,
    query_rate: float = 0.15,
    skip_every: int = 0,
    votes: int = 5,
    mode: str = "icd",
) -> pl.DataFrame:
    """A plausible predictions table: uncertain samples get queried, teacher votes with
    varying agreement, a_min=0.6 acceptance, ~60% accuracy; every ``skip_every``-th row
    skipped (0: none)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        truth = CLASSES[i % len(CLASSES)]
        skipped = bool(skip_every) and i % skip_every == skip_every - 1
        unc = float(rng.gamma(2.0, 0.5))
        queried = not skipped and rng.random() < query_rate * (1 + unc)
        wins = int(rng.integers(1, votes + 1)) if queried else 0
        vote_list = [truth] * wins + [CLASSES[(i + 1) % 4]] * (votes - wins) if queried else []
        agreement = wins / votes if queried else None
        accepted = queried and agreement >= 0.6
        correct = bool(rng.random() < 0.6)
        final = truth if correct else CLASSES[(i + 2) % 4]
        rows.append(
            {
                "run_id": run_id,
                "mode": mode,
                "dataset": "shapes",
                "sample_id": f"s{i:05d}",
                "chunk": i // chunk_size,
                "stream_pos": i,
                "question": "What shape is this?",
                "answers": [truth],
                "skip_reason": "undecodable image" if skipped else None,
                "zs_answer": None if skipped else final,
                "zs_uncertainty": None if skipped else unc,
                "queried": queried,
                "teacher_votes": vote_list,
                "teacher_label": truth if queried else None,
                "agreement": agreement,
                "accepted": accepted,
                "teacher_error": None,
                "demo_ids": [] if skipped else [f"s{max(i - 1, 0):05d}"],
                "demo_labels": [] if skipped else [truth],
                "demo_accuracy": None if skipped else 1.0,
                "icl_answer": None if skipped else final,
                "icl_uncertainty": None if skipped else unc / 2,
                "final_answer": None if skipped else final,
                "final_source": None if skipped else ("teacher" if queried else "student_icl"),
                "score": None if skipped else float(correct),
            }
        )
    return pl.DataFrame(rows, schema=PREDICTION_COLUMNS)


def empty_predictions() -> pl.DataFrame:
    return pl.DataFrame(schema=PREDICTION_COLUMNS)


def write_run(root: Path, preds: pl.DataFrame, summary: dict, config: dict | None = None) -> Path:
    """A run folder as the stream flow leaves it: per-chunk parquet, summary, config."""
    import json

    run_id = preds.get_column("run_id")[0]
    run_dir = root / "runs" / run_id
    (run_dir / "predictions").mkdir(parents=True, exist_ok=True)
    for (chunk,), part in preds.group_by("chunk"):
        part.write_parquet(run_dir / "predictions" / f"chunk-{chunk:05d}.parquet")
    (run_dir / "summary.json").write_text(
        json.dumps(summary | {"run_id": run_id, "run_dir": str(run_dir)})
    )
    if config is not None:
        (run_dir / "config.json").write_text(json.dumps(config))
    return run_dir


def assert_png(path: Path | bytes) -> tuple[int, int]:
    """A valid, non-empty PNG: signature, PIL decodes it fully, positive size."""
    data = path if isinstance(path, bytes) else Path(path).read_bytes()
    assert len(data) > 0
    assert data[:8] == PNG_SIGNATURE
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "PNG"
        img.verify()
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        assert img.size[0] > 0 and img.size[1] > 0
        return img.size
