"""Golden schema tests: every registered hub dataset against its dataset card.

``schemas/<name>.json`` holds, per registered dataset, the card's address, its split names
and its features in the card's own ``dataset_info.features`` form (a class_label lists only
its first names). Each test writes a tiny hub-layout copy of that schema (a README card
with the features and one parquet per split, a handful of rows with generated images) and
opens it through ``open_stream`` on the ``hf:`` streaming path a real run takes. A registry
entry whose columns, split, label feature or class-name handling no longer match its card
fails here, not on a user's first run; a card that changed is a schema file to update.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path
from typing import Any

import datasets
import pytest
import yaml
from PIL import Image

from icd.config import DataConfig
from icd.data.registry import DATASETS, readable_name
from icd.data.stream import open_stream

SCHEMAS = Path(__file__).parent / "schemas"
ROWS = 5
HUB = sorted(name for name, spec in DATASETS.items() if spec.kind == "hf")


def _schema(name: str) -> dict[str, Any]:
    return json.loads((SCHEMAS / f"{name}.json").read_text())


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 10), (40 * i % 256, 90, 160)).save(buf, format="PNG")
    return buf.getvalue()


def _value(feature: Any, column: str, i: int, folder: Path) -> Any:
    """A plausible cell of ``feature``: a PNG for an image, a class index, a list of two
    items for a sequence, a readable image file path for a URL-like image column."""
    if isinstance(feature, datasets.Image):
        return {"bytes": _png(i), "path": None}
    if isinstance(feature, datasets.ClassLabel):
        return i % feature.num_classes
    if isinstance(feature, dict):
        return {k: _value(v, k, i, folder) for k, v in feature.items()}
    if isinstance(feature, list | datasets.Sequence | datasets.List | datasets.LargeList):
        inner = feature[0] if isinstance(feature, list) else feature.feature
        if isinstance(inner, dict):
            return [{k: _value(v, k, i * 2 + j, folder) for k, v in inner.items()} for j in (0, 1)]
        return [_value(inner, column, i * 2 + j, folder) for j in (0, 1)]
    dtype = feature.dtype
    if dtype == "string":
        return f"{column} {i}"
    if dtype.startswith(("int", "uint")):
        return i + 1
    if dtype.startswith("float"):
        return 0.5
    if dtype == "bool":
        return True
    raise AssertionError(f"no generator for {dtype}")


def _hub_copy(name: str, schema: dict[str, Any], folder: Path) -> None:
    """A local folder laid out like the hub repository: card YAML + data/<split>-*.parquet."""
    spec = DATASETS[name]
    card = {
        "dataset_info": {"features": schema["features"]},
        "configs": [
            {
                "config_name": "default",
                "data_files": [{"split": s, "path": f"data/{s}-*"} for s in schema["splits"]],
            }
        ],
    }
    (folder / "data").mkdir(parents=True)
    (folder / "README.md").write_text(f"---\n{yaml.safe_dump(card, sort_keys=False)}---\n")
    features = datasets.Features._from_yaml_list(schema["features"])
    images = folder / "images"
    images.mkdir()
    for split in schema["splits"]:
        rows = []
        for i in range(ROWS):
            row = {c: _value(f, c, i, folder) for c, f in features.items()}
            if features.get(spec.image_column) == datasets.Value("string"):  # an image URL
                path = images / f"{split}-{i}.png"
                path.write_bytes(_png(i))
                row[spec.image_column] = str(path)
            rows.append(row)
        datasets.Dataset.from_list(rows, features=features).to_parquet(
            str(folder / "data" / f"{split}-00000-of-00001.parquet")
        )


def test_every_registered_hub_dataset_has_a_schema_naming_its_card():
    assert sorted(p.stem for p in SCHEMAS.glob("*.json")) == HUB
    for name in HUB:
        schema = _schema(name)
        assert schema["dataset"] == name
        assert schema["card"] == f"https://huggingface.co/datasets/{DATASETS[name].target}"


@pytest.mark.parametrize("name", HUB)
def test_the_registry_entry_reads_its_card_schema(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # datasets' cache of the local "hub" copy stays here
    schema = _schema(name)
    registered = DATASETS[name]
    columns = {f["name"] for f in schema["features"]}
    roles = ("image_column", "question_column", "label_column", "answers_column", "id_column")
    used = {getattr(registered, r) for r in roles} - {None}
    assert used <= columns, f"registry columns not on the card: {sorted(used - columns)}"
    assert registered.split in schema["splits"], f"split {registered.split!r} not on the card"

    folder = tmp_path / "hub-copy"
    _hub_copy(name, schema, folder)
    spec = dataclasses.replace(registered, source=f"hf:{folder}")
    stream = open_stream(DataConfig(dataset=name), spec=spec)  # the streaming hub path
    (chunk,) = list(stream.chunks(ROWS))
    assert len(chunk.samples) == ROWS
    assert [s.skip_reason for s in chunk.samples] == [None] * ROWS
    assert all(s.image is not None and s.question for s in chunk.samples)
    if registered.id_column is not None:
        assert len({s.sample_id for s in chunk.samples}) == ROWS
        assert not any(s.sample_id.startswith(f"{name}:") for s in chunk.samples)

    label = next((f for f in schema["features"] if f["name"] == registered.label_column), None)
    if registered.task == "classification":
        assert label is not None and "class_label" in label["dtype"]
        names = list(label["dtype"]["class_label"]["names"].values())
        expected = [readable_name(n) if registered.readable_names else n for n in names]
        assert stream.class_names == expected
        assert [s.answers for s in chunk.samples] == [
            [expected[i % len(expected)]] for i in range(ROWS)
        ]
        for cls in stream.synonyms:  # synonyms are keyed on names the card's classes give
            assert cls in stream.class_names
        if "class_names" not in schema:  # the card's full class list: no synonym is lost
            assert len(stream.synonyms) == len(registered.synonyms)
    else:
        assert stream.class_names is None
        assert all(len(s.answers) == 2 for s in chunk.samples)  # every answer / caption kept
        assert all(isinstance(a, str) and a for s in chunk.samples for a in s.answers)


def test_a_split_the_card_does_not_have_fails_the_golden_test(tmp_path, monkeypatch):
    """The golden test's own check: renaming the registry's split breaks the read."""
    monkeypatch.chdir(tmp_path)
    name = "vizwiz"
    _hub_copy(name, _schema(name), tmp_path / "hub-copy")
    spec = dataclasses.replace(DATASETS[name], source=f"hf:{tmp_path / 'hub-copy'}")
    open_stream(DataConfig(dataset=name), spec=spec)
    with pytest.raises(Exception, match="validation"):
        open_stream(DataConfig(dataset=name), spec=dataclasses.replace(spec, split="validation"))
