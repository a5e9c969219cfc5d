"""Registering datasets from a YAML file (``data.registry``) without editing Python."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from icd.check import run_checks
from icd.config import DataConfig, load_config
from icd.data.registry import RegistryFileError, UnknownDataset, get_dataset, load_registry_file
from icd.data.stream import open_stream


def _birds(folder):
    """A tiny parquet of two species with string labels, in ``folder/birds``."""
    import datasets

    def png(i):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (i * 60, 20, 20)).save(buf, format="PNG")
        return {"bytes": buf.getvalue(), "path": None}

    rows = [
        {"img": png(i), "species": ["Blue_Jay", "Barn_Owl"][i % 2], "uid": f"b{i}"}
        for i in range(4)
    ]
    features = datasets.Features(
        img=datasets.Image(), species=datasets.Value("string"), uid=datasets.Value("string")
    )
    (folder / "birds").mkdir()
    datasets.Dataset.from_list(rows, features=features).to_parquet(
        str(folder / "birds" / "t.parquet")
    )


REGISTRY = """\
datasets:
  mybirds:
    source: parquet:birds
    split: test
    image_column: img
    label_column: species
    id_column: uid
    question: Which bird is this?
    synonyms:
      Blue Jay: [jay]
"""


def test_a_yaml_entry_is_a_dataset_like_any_other(tmp_path):
    _birds(tmp_path)
    file = tmp_path / "datasets.yaml"
    file.write_text(REGISTRY)
    spec = load_registry_file(file)["mybirds"]
    assert spec.source == f"parquet:{tmp_path / 'birds'}"  # relative to the file
    assert get_dataset("mybirds", file) == spec
    assert get_dataset("cub200", file).name == "cub200"  # built-ins stay

    stream = open_stream(DataConfig(dataset="mybirds", registry=str(file)))
    assert stream.class_names == ["Barn Owl", "Blue Jay"]
    assert stream.synonyms == {"Blue Jay": ["jay"]}
    samples = next(stream.chunks(4)).samples
    assert [s.sample_id for s in samples] == ["b0", "b1", "b2", "b3"]
    assert samples[0].question == "Which bird is this?" and samples[0].answers == ["Blue Jay"]

    cfg = load_config(
        "smoke",
        overrides=[f"data.registry={file}", "data.dataset=mybirds", "data.source=null"],
    )
    (line,) = [c for c in run_checks(cfg) if c.name == "dataset"]
    assert line.ok and line.detail.startswith("'mybirds' (parquet:")
    with pytest.raises(UnknownDataset, match="mybirds"):
        get_dataset("nobirds", file)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "datasets:\n  x: {source: 'parquet:a', split: test, label_colum: y}\n",
            "unknown key 'label_colum'",
        ),
        ("datasets:\n  x: {split: test, label_column: y}\n", "source: Field required"),
        (
            "datasets:\n  x: {source: 'parquet:a', split: test, task: detection}\n",
            "task: Input should be",
        ),
        (
            "datasets:\n  x: {source: 'web:a', split: test, label_column: y}\n",
            "source 'web:a' must look like",
        ),
        (
            "datasets:\n  x: {source: 'parquet:a', split: test}\n",
            "a classification set needs label_column",
        ),
        ("x: {source: 'parquet:a'}\n", "expected a top-level 'datasets:' mapping"),
        ("datasets: [\n", "not valid YAML"),
    ],
)
def test_a_bad_registry_file_is_one_line_naming_the_key(tmp_path, text, message):
    file = tmp_path / "datasets.yaml"
    file.write_text(text)
    with pytest.raises(RegistryFileError) as e:
        load_registry_file(file)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert str(file) in str(e.value)


def test_a_missing_registry_file_is_one_line(tmp_path):
    with pytest.raises(RegistryFileError, match="cannot read it"):
        open_stream(DataConfig(dataset="x", registry=str(tmp_path / "none.yaml")))
