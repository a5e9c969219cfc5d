"""The procedural shapes fixture: built fast, read back through `datasets`, deterministic."""

from __future__ import annotations

import hashlib
import io
import json

import pytest
from datasets import ClassLabel, load_dataset
from datasets import Image as ImageFeature
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from icd.data import shapes
from icd.data.shapes import build_shapes_dataset


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return root, build_shapes_dataset(root, n=120, seed=3, corrupt_every=50)


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_reads_back_through_datasets(built, tmp_path):
    _, folder = built
    ds = load_dataset(
        "parquet", data_files=shapes.data_files(folder), split="train", cache_dir=str(tmp_path)
    )
    assert ds.num_rows == 120
    assert ds.column_names == ["id", "image", "question", "label", "captions"]
    assert isinstance(ds.features["image"], ImageFeature)
    label = ds.features["label"]
    assert isinstance(label, ClassLabel) and label.num_classes >= 20
    assert label.names == shapes.CLASS_NAMES
    row = ds[0]
    assert row["question"] == shapes.QUESTION
    assert row["image"].size == (32, 32)  # decoded by datasets' own Image feature
    # The dataset card declares the split, so the folder loads like a hub dataset too.
    again = load_dataset(str(folder), split="train", cache_dir=str(tmp_path))
    assert again.num_rows == 120 and again.features["label"].names == shapes.CLASS_NAMES


def test_card_and_meta_list_classes_and_synonyms(built):
    _, folder = built
    meta = json.loads((folder / "shapes.json").read_text())
    assert meta["class_names"] == shapes.CLASS_NAMES
    assert len(set(meta["class_names"])) == len(meta["class_names"]) >= 20
    assert meta["synonyms"]["red square"] == ["red box"]
    assert set(meta["synonyms"]) <= set(meta["class_names"])
    assert meta["corrupt_ids"] == ["shapes3-000049", "shapes3-000099"]
    assert "red circle" in (folder / "README.md").read_text()


def test_corrupt_samples_do_not_decode_and_the_rest_do(built, tmp_path):
    _, folder = built
    ds = load_dataset(
        "parquet", data_files=shapes.data_files(folder), split="train", cache_dir=str(tmp_path)
    )
    ds = ds.cast_column("image", ImageFeature(decode=False))
    bad = 0
    for row in ds:
        data = row["image"]["bytes"]
        if row["id"] in ("shapes3-000049", "shapes3-000099"):
            with pytest.raises(Exception):  # noqa: B017 - PIL raises several types
                Image.open(io.BytesIO(data)).load()
            bad += 1
        else:
            img = Image.open(io.BytesIO(data))
            img.load()
            assert img.mode == "RGB" and img.size == (32, 32)
    assert bad == 2


def test_same_seed_same_bytes_other_seed_other_bytes(built, tmp_path):
    _, folder = built
    twin = build_shapes_dataset(tmp_path / "a", n=120, seed=3, corrupt_every=50)
    assert _sha(shapes.data_files(twin)[0]) == _sha(shapes.data_files(folder)[0])
    other = build_shapes_dataset(tmp_path / "b", n=120, seed=4, corrupt_every=50)
    assert _sha(shapes.data_files(other)[0]) != _sha(shapes.data_files(folder)[0])
    assert shapes.render_shape(7, seed=3) == shapes.render_shape(7, seed=3)
    assert shapes.render_shape(7, seed=3) != shapes.render_shape(8, seed=3)


def test_second_call_is_cached(built, monkeypatch):
    root, folder = built
    before = (folder / shapes.data_files(folder)[0]).stat().st_mtime_ns

    def boom(*args, **kwargs):
        raise AssertionError("rendered again")

    monkeypatch.setattr(shapes, "render_shape", boom)
    assert build_shapes_dataset(root, n=120, seed=3, corrupt_every=50) == folder
    assert (folder / shapes.data_files(folder)[0]).stat().st_mtime_ns == before
    # Different arguments are a different dataset, in their own folder.
    assert shapes.dataset_dir(root, n=120, seed=3, corrupt_every=0) != folder


def test_sample_does_not_depend_on_n(tmp_path):
    small = build_shapes_dataset(tmp_path, n=40, seed=1, corrupt_every=0)
    large = build_shapes_dataset(tmp_path, n=90, seed=1, corrupt_every=0)
    a = load_dataset(
        "parquet", data_files=shapes.data_files(small), split="train", cache_dir=str(tmp_path / "c")
    )
    b = load_dataset(
        "parquet", data_files=shapes.data_files(large), split="train", cache_dir=str(tmp_path / "c")
    )
    a = a.cast_column("image", ImageFeature(decode=False))
    b = b.cast_column("image", ImageFeature(decode=False)).select(range(40))
    assert a["label"] == b["label"]
    assert [r["bytes"] for r in a["image"]] == [r["bytes"] for r in b["image"]]


@given(seed=st.integers(0, 2**31), block=st.integers(0, 10_000))
def test_every_block_of_classes_holds_each_class_once(seed, block):
    k = len(shapes.CLASS_NAMES)
    labels = [shapes.label_of(block * k + j, seed) for j in range(k)]
    assert sorted(labels) == list(range(k))


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="n must be"):
        build_shapes_dataset(tmp_path, n=0)
    with pytest.raises(ValueError, match="size"):
        build_shapes_dataset(tmp_path, n=5, size=4)


def test_meta_splits_base_and_novel_classes(built):
    _, folder = built
    meta = json.loads((folder / "shapes.json").read_text())
    base, novel = meta["base_classes"], meta["novel_classes"]
    assert sorted(base + novel) == sorted(shapes.CLASS_NAMES) and not set(base) & set(novel)
    assert len(base) * 3 == len(shapes.CLASS_NAMES)  # a third of the classes are base
    assert all(c.split(" ", 1)[1] in shapes.BASE_SHAPES for c in base)
