"""The flow reads a streamed source once: rows read = rows used (+ one shuffle buffer)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets
import pytest

from icd.data import shapes
from tests.pipeline.test_stream import _run

pytestmark = pytest.mark.slow
N = 150  # rows in the streamed source


@pytest.fixture
def counted_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[int]:
    """Route `load_dataset(<hub id>, streaming=True)` to a local shapes folder (a hub-style
    dataset card, read as a real `IterableDataset`) and count every row the source yields."""
    folder = shapes.build_shapes_dataset(tmp_path / "fixtures", n=N, corrupt_every=0)
    real = datasets.load_dataset
    rows: list[int] = [0]

    def count(row: dict[str, Any]) -> dict[str, Any]:
        rows[0] += 1
        return row

    def load(path: str, name: Any = None, split: Any = None, streaming: bool = False, **kw: Any):
        ds = real(str(folder), split=split, streaming=streaming)
        return ds.map(count, features=ds.features) if streaming else ds

    monkeypatch.setattr(datasets, "load_dataset", load)
    return rows


@pytest.mark.parametrize("order_seed", [None, 3])
def test_flow_reads_a_streamed_source_once(
    tmp_path: Path, counted_hub: list[int], order_seed: int | None
) -> None:
    limit, chunk = 64, 8  # 8 chunks
    sets = [
        "data.source=hf:someone/shapes",
        f"data.limit={limit}",
        f"pipeline.chunk_size={chunk}",
        "method.mode=student_zero_shot",
        f"data.order_seed={'null' if order_seed is None else order_seed}",
    ]
    summary = _run(tmp_path, f"reads-{order_seed}", *sets)
    assert summary["samples"] == limit
    if order_seed is None:
        assert counted_hub[0] == limit  # exactly the rows used
    else:
        # One shuffle buffer on top of the rows used (here the buffer holds the whole source).
        assert limit < counted_hub[0] <= N
