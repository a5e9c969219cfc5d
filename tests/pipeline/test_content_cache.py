"""Task results are keyed on content: changed data recomputes, unchanged data is reused."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import datasets
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from icd.config import ModelConfig, load_config
from icd.data import shapes
from icd.data.stream import open_stream
from icd.data.types import Chunk, Sample
from icd.tasks import base as stages
from tests.pipeline.test_stream import _count_model_calls, _pool_rows, _run

pytestmark = pytest.mark.slow


def _sample(i: int, **kw: object) -> Sample:
    base = dict(
        sample_id=f"s{i}", stream_pos=i, question="q?", answers=["cat"], image_bytes=b"png%d" % i
    )
    base.update(kw)
    return Sample(**base)  # type: ignore[arg-type]


def test_chunk_key_is_a_digest_of_content_not_of_positions() -> None:
    samples = [_sample(i) for i in range(3)]
    key = Chunk(0, samples).key
    assert Chunk(7, [dataclasses.replace(s) for s in samples]).key == key  # index, identity
    moved = [dataclasses.replace(s, stream_pos=s.stream_pos + 100) for s in samples]
    assert Chunk(0, moved).key == key
    changes = [
        {"image_bytes": b"png0!"},
        {"question": "q!"},
        {"answers": ["dog"]},
        {"skip_reason": "bad_image: truncated"},
        {"sample_id": "s9"},
    ]
    keys = {key}
    for change in changes:
        keys.add(Chunk(0, [dataclasses.replace(samples[0], **change), *samples[1:]]).key)
    assert len(keys) == len(changes) + 1
    assert Chunk(0, samples[::-1]).key != key  # order is content too
    # Moving bytes between fields is a different chunk (fields are length-prefixed).
    a = _sample(0, question="ab", answers=["c"])
    b = _sample(0, question="a", answers=["bc"])
    assert Chunk(0, [a]).key != Chunk(0, [b]).key


def test_weights_identity_follows_the_files_of_a_local_model(tmp_path: Path) -> None:
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"\0" * 1000)
    cfg = ModelConfig(model_id=str(folder))
    first = stages.weights_identity(cfg)
    assert first and stages.weights_identity(cfg) == first
    (folder / "model.safetensors").write_bytes(b"\1" * 1000)  # retrained: same name, size
    assert stages.weights_identity(cfg) not in ("", first)
    assert stages.weights_identity(ModelConfig(model_id="org/hub-model")) == ""
    assert stages.weights_identity(ModelConfig(backend="oracle", model_id=str(folder))) == ""


def test_smoke_then_default_shapes_source_on_one_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The smoke preset's shapes variant, then the default one: same sample ids, different
    corrupt rows. Chunks with the same content are reused, the others recomputed."""
    sets = ("data.limit=112", "pipeline.chunk_size=16", "seed=11", "models.teacher.backend=oracle")
    _run(tmp_path, "smoke", *sets)
    calls = _count_model_calls(monkeypatch)
    summary = _run(tmp_path, "plain", *sets, "data.source=fixture:shapes")
    cfg = load_config("smoke", overrides=list(sets))
    smoke_src = open_stream(cfg.data)
    plain_src = open_stream(cfg.data.model_copy(update={"source": "fixture:shapes"}))
    old = list(smoke_src.chunks(16))
    new = list(plain_src.chunks(16))
    changed = sum(a.key != b.key for a, b in zip(old, new, strict=True))
    assert changed >= 1  # the two sources differ somewhere in the first 112 samples
    assert calls[("embed", "embed_images")] == changed
    assert calls[("zero_shot", "generate")] == changed
    df = pl.read_parquet(Path(summary["run_dir"]) / "predictions.parquet")
    expected = {s.sample_id: s.skip_reason for c in new for s in c.samples}
    assert dict(zip(df["sample_id"], df["skip_reason"], strict=True)) == expected
    assert summary["samples"] == 112


def _write_shapes_parquet(path: Path, n: int, order: list[int] | None = None) -> None:
    """The shapes fixture as a plain parquet a user might have: image, question and the
    label as a class name; no id column (ids are then row positions)."""
    folder = shapes.build_shapes_dataset(path.parent / "fixtures", n=n, corrupt_every=0)
    table = pa.concat_tables([pq.read_table(f) for f in shapes.data_files(folder)])
    names = datasets.Features.from_arrow_schema(table.schema)["label"].names
    labels = [names[i] for i in table.column("label").to_pylist()]
    plain = pa.table(
        {
            "image": table.column("image"),
            "question": table.column("question"),
            "label": pa.array(labels, pa.string()),
        }
    )
    if order is not None:
        plain = plain.take(pa.array(order))
    pq.write_table(plain, path)


def test_row_swapped_parquet_recomputes_every_stage(tmp_path: Path) -> None:
    """Same file name, same row-position ids, rows swapped pairwise: nothing may be reused,
    and the oracle's pool labels must all be the samples' true classes."""
    n = 64
    data = tmp_path / "mine.parquet"
    sets = (
        f"data.source=parquet:{data}",
        "data.dataset=mine",
        "data.limit=64",
        "pipeline.chunk_size=32",
        "models.teacher.backend=oracle",
        "method.policy.budget=0.5",
        "method.voting.n=1",
        "seed=12",
    )
    _write_shapes_parquet(data, n)
    _run(tmp_path, "before", *sets)
    _write_shapes_parquet(data, n, order=[i ^ 1 for i in range(n)])  # swap rows 0<->1, ...
    summary = _run(tmp_path, "after", *sets)
    df = pl.read_parquet(Path(summary["run_dir"]) / "predictions.parquet")
    truth = dict(zip(df["sample_id"], df["answers"].list.first(), strict=True))
    pool = _pool_rows(tmp_path, "after")
    assert pool.height >= 16
    matched = sum(
        truth[s] == label for s, label in zip(pool["sample_id"], pool["label"], strict=True)
    )
    assert matched == pool.height  # 100% pool-label accuracy
    ledger = (Path(summary["run_dir"]) / "teacher_calls.jsonl").read_text().splitlines()
    asked = sum(len(json.loads(line)["sample_ids"]) for line in ledger)
    assert asked == summary["queried"] > 0  # the teacher was really asked again
