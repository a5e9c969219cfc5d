"""The captioning view of the shapes fixture: reference captions true of each scene, read
through the registry's `shapes_captions` entry."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from icd.config import DataConfig, load_config
from icd.data import shapes
from icd.data.stream import open_stream


def test_captions_are_deterministic_and_describe_the_class() -> None:
    for i in range(50):
        caps = shapes.captions_of(i, seed=2)
        assert caps == shapes.captions_of(i, seed=2)
        assert len(caps) == shapes.N_CAPTIONS == len(set(caps))
        name = shapes.CLASS_NAMES[shapes.label_of(i, seed=2)]
        colour = name.split()[0]
        assert caps[0] == f"a {name}"
        assert all(colour in c for c in caps)
    assert any(shapes.captions_of(i, 0) != shapes.captions_of(i, 1) for i in range(10))


def test_captions_match_the_drawn_scene() -> None:
    """Size, position and background words follow what was drawn: large shapes cover
    more pixels than small ones; "left" shapes' ink lies left of "right" shapes'; a
    "white" background is brighter than a "light grey" one."""
    ink: dict[str, list[float]] = {"small": [], "large": []}
    centre_x: dict[str, list[float]] = {"left": [], "right": []}
    corner: dict[str, list[float]] = {"white": [], "light grey": []}
    for i in range(240):
        caps = shapes.captions_of(i)
        px = np.asarray(Image.open(io.BytesIO(shapes.render_shape(i))).convert("RGB"), float)
        bg = np.median(px[[0, 0, -1, -1], [0, -1, 0, -1]], axis=0)
        mask = np.abs(px - bg).sum(axis=2) > 60
        size = caps[1].split()[1]
        if size in ink:
            ink[size].append(mask.mean())
        if ("left" in caps[2]) != ("right" in caps[2]) and mask.any():
            side = "left" if "left" in caps[2] else "right"
            centre_x[side].append(np.nonzero(mask)[1].mean())
        for word in corner:
            if f"on a {word} background" in caps[3]:
                corner[word].append(bg.mean())
    assert np.mean(ink["large"]) > np.mean(ink["small"])
    assert np.mean(centre_x["left"]) < np.mean(centre_x["right"]) - 4
    assert np.mean(corner["white"]) > np.mean(corner["light grey"])


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory):
    return tmp_path_factory.mktemp("fixtures")


def test_shapes_captions_streams_the_same_samples_with_captions_as_answers(root) -> None:
    caps = open_stream(DataConfig(dataset="shapes_captions", limit=60), root=root)
    cls = open_stream(DataConfig(dataset="shapes", limit=60), root=root)
    assert caps.task == "captioning" and caps.class_names is None and caps.synonyms == {}
    a, b = next(caps.chunks(60)), next(cls.chunks(60))
    assert [s.sample_id for s in a.samples] == [s.sample_id for s in b.samples]
    for s, t in zip(a.samples, b.samples, strict=True):
        i = int(s.sample_id.rsplit("-", 1)[1])
        assert s.answers == shapes.captions_of(i)
        assert t.answers == [shapes.CLASS_NAMES[shapes.label_of(i)]]
        assert s.image_bytes == t.image_bytes and s.question == t.question
    assert caps.dataset_info()["task"] == "captioning"


def test_the_smoke_preset_reads_as_captions(root) -> None:
    """`icd run --preset smoke --set data.dataset=shapes_captions`: the smoke preset's own
    fixture source (with its corruption rate) carries the captions too."""
    cfg = load_config("smoke", overrides=["data.dataset=shapes_captions", "data.limit=110"])
    stream = open_stream(cfg.data, root=root)
    samples = [s for c in stream.chunks(55) for s in c.samples]
    assert stream.task == "captioning"
    assert [s.stream_pos for s in samples if s.skip_reason] == [99]  # corrupt_every=100
    assert all(len(s.answers) == shapes.N_CAPTIONS for s in samples)
    preset = load_config("smoke-captions")
    assert preset.data.dataset == "shapes_captions"
    assert preset.data.source == cfg.data.source
