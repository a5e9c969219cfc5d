"""Procedural coloured shapes: the offline benchmark stream, for classification and captioning.

``build_shapes_dataset`` draws ``n`` small PNGs (6 shapes x 4 colours = 24 classes, with
varied position, size, a slight rotation, background tint and light noise), writes them as one
parquet file in the Hugging Face ``datasets`` layout (``image`` is the ``Image`` feature's
``{bytes, path}`` struct, ``label`` a ``ClassLabel``, ``captions`` a list of
:data:`N_CAPTIONS` reference captions describing the drawn scene, :func:`captions_of`) next
to a dataset card and a ``shapes.json`` listing class names and synonyms. Every
``corrupt_every``-th sample carries undecodable image bytes so that the pipeline's skip path
is exercised. The registry reads the same files as the classification set ``shapes`` and
the captioning set ``shapes_captions``.

Everything is a pure function of the arguments: the same seed gives the same bytes, and
sample ``i`` does not depend on ``n`` (a 500-sample build is a prefix of a 2000 one, up to
which samples are corrupted).

The world is split the way ICD's setting is (the mini-world, :mod:`icd.miniworld`): the
**base** classes (:data:`BASE_SHAPES` in every colour, a third of the classes) are the ones
the offline student knows by name; the **novel** ones it can only learn from
demonstrations. The teacher and the embedder know all of them.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from icd.storage.locks import build_dir_once

SHAPES = ("circle", "square", "triangle", "cross", "ring", "star")
BASE_SHAPES = ("circle", "square")  # the offline student knows these by name
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (35, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (225, 190, 20),
}
CLASS_NAMES: list[str] = [f"{c} {s}" for c in COLOURS for s in SHAPES]
BASE_CLASSES: list[str] = [c for c in CLASS_NAMES if c.split(" ", 1)[1] in BASE_SHAPES]
NOVEL_CLASSES: list[str] = [c for c in CLASS_NAMES if c not in BASE_CLASSES]
QUESTION = "What is shown in the image?"
N_CAPTIONS = 5  # reference captions per image (as in COCO and Flickr30k)

_SHAPE_SYNONYMS: dict[str, list[str]] = {
    "circle": ["disk", "disc", "dot"],
    "square": ["box"],
    "cross": ["plus", "plus sign"],
    "ring": ["donut", "annulus", "hollow circle"],
    "star": ["five-pointed star"],
}
SYNONYMS: dict[str, list[str]] = {
    f"{c} {s}": [f"{c} {alt}" for alt in alts]
    for c in COLOURS
    for s, alts in _SHAPE_SYNONYMS.items()
}

_FORMAT_VERSION = 4  # bump when the drawing or the columns change, so cached builds are redone
_DATA_FILE = "data/train-00000-of-00001.parquet"
_META_FILE = "shapes.json"


def dataset_dir(
    root: Path, n: int = 2000, seed: int = 0, corrupt_every: int = 500, size: int = 32
) -> Path:
    """Folder a build with these arguments lives in: ``root/shapes-<n>-<seed>`` for the
    default corruption and size, with a suffix naming any non-default ones."""
    name = f"shapes-{n}-{seed}"
    if corrupt_every != 500:
        name += f"-c{corrupt_every}"
    if size != 32:
        name += f"-s{size}"
    return Path(root) / name


def data_files(path: Path) -> list[str]:
    """The parquet files of a built shapes dataset folder (for ``load_dataset("parquet", ...)``)."""
    return [str(Path(path) / _DATA_FILE)]


def build_shapes_dataset(
    root: Path, n: int = 2000, seed: int = 0, corrupt_every: int = 500, size: int = 32
) -> Path:
    """Build (or find cached) the shapes dataset and return its folder.

    The folder holds ``data/train-00000-of-00001.parquet`` (columns ``id``, ``image``,
    ``question``, ``label``), ``README.md`` (a dataset card whose YAML header declares the
    features and the ``train`` split, so ``load_dataset(str(folder))`` also works) and
    ``shapes.json``. A second call with the same arguments returns at once. Processes that
    call it at once on one ``root`` share one build (:func:`icd.storage.locks.build_dir_once`:
    one builds under a lock while the others wait); the build writes to a temporary
    folder renamed into place, so an interrupted build never leaves a half-written dataset
    and a finished one is never removed while another process reads it.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if size < 16:
        raise ValueError(f"size must be >= 16 pixels, got {size}")
    target = dataset_dir(root, n, seed, corrupt_every, size)
    params: dict[str, int] = {
        "n": n,
        "seed": seed,
        "corrupt_every": corrupt_every,
        "size": size,
        "version": _FORMAT_VERSION,
    }
    build_dir_once(
        target,
        lambda folder: _is_built(folder, params),
        lambda tmp: _write_dataset(tmp, params),
    )
    return target


def _write_dataset(folder: Path, params: dict[str, int]) -> None:
    """Draw the dataset ``params`` describe and write its files into the empty ``folder``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n, seed, corrupt_every, size = (params[k] for k in ("n", "seed", "corrupt_every", "size"))
    rows: dict[str, list[Any]] = {
        "id": [],
        "image": [],
        "question": [],
        "label": [],
        "captions": [],
    }
    corrupt_ids: list[str] = []
    for i in range(n):
        sample_id = f"shapes{seed}-{i:06d}"
        data = render_shape(i, seed, size)
        if corrupt_every > 0 and (i + 1) % corrupt_every == 0:
            data = _corrupt_bytes(data, len(corrupt_ids))
            corrupt_ids.append(sample_id)
        rows["id"].append(sample_id)
        rows["image"].append({"bytes": data, "path": f"{sample_id}.png"})
        rows["question"].append(QUESTION)
        rows["label"].append(label_of(i, seed))
        rows["captions"].append(captions_of(i, seed, size))

    features = _features()
    (folder / "data").mkdir(parents=True)
    # The schema carries the `huggingface` metadata, so `datasets` reads `image` back as
    # the Image feature and `label` as a ClassLabel.
    table = pa.Table.from_pydict(rows, schema=features.arrow_schema)
    pq.write_table(table, folder / _DATA_FILE, row_group_size=256)
    meta = {
        **params,
        "question": QUESTION,
        "class_names": CLASS_NAMES,
        "synonyms": SYNONYMS,
        "base_classes": BASE_CLASSES,
        "novel_classes": NOVEL_CLASSES,
        "corrupt_ids": corrupt_ids,
        "data_files": [_DATA_FILE],
    }
    card = _card(features, n, seed, corrupt_every, size, len(corrupt_ids), table.nbytes)
    (folder / "README.md").write_text(card)
    # shapes.json last: a folder holding it is complete (_is_built)
    (folder / _META_FILE).write_text(json.dumps(meta, indent=1))


def _is_built(target: Path, params: dict[str, int]) -> bool:
    meta_path = target / _META_FILE
    if not meta_path.exists() or not (target / _DATA_FILE).exists():
        return False
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return all(meta.get(k) == v for k, v in params.items())


def label_of(i: int, seed: int = 0) -> int:
    """Class of sample ``i``: each block of 24 (one per class) consecutive samples holds every class once,
    in an order drawn from (seed, block) — balanced and independent of ``n``."""
    block, offset = divmod(i, len(CLASS_NAMES))
    order = np.random.default_rng([seed, 7919, block]).permutation(len(CLASS_NAMES))
    return int(order[offset])


@dataclass(frozen=True)
class Scene:
    """What sample ``i`` shows, in the units the captions use.

    ``colour`` and ``shape`` name the class; ``radius`` is the shape's radius as a share of
    the image side (0.26–0.38); ``x`` and ``y`` its centre as shares of the side (0 = left /
    top); ``background`` the RGB of the tinted background.
    """

    colour: str
    shape: str
    radius: float
    x: float
    y: float
    background: tuple[int, int, int]


@dataclass(frozen=True)
class _Drawing:
    """The random parameters of one drawing (pixels of the drawing canvas)."""

    background: tuple[int, int, int]
    fill: tuple[int, ...]
    radius: float
    cx: float
    cy: float
    angle: float  # radians


def _draw_params(rng: np.random.Generator, colour_name: str, s: int) -> _Drawing:
    """The random parameters of one drawing, in the order :func:`render_shape` has always
    drawn them (so images stay byte-identical): background, fill, radius, centre, tilt."""
    red, green, blue = (int(v) for v in rng.integers(200, 250, size=3))
    fill = tuple(int(np.clip(v + rng.integers(-25, 26), 0, 255)) for v in COLOURS[colour_name])
    radius = rng.uniform(0.26, 0.38) * s
    cx = rng.uniform(radius + 1, s - radius - 1)
    cy = rng.uniform(radius + 1, s - radius - 1)
    angle = rng.uniform(-0.3, 0.3)  # a slight tilt: shapes stay recognisable at 32 px
    return _Drawing((red, green, blue), fill, radius, cx, cy, angle)


_SCALE = 2  # draw at twice the size, then downsample: cheap anti-aliasing


def scene(i: int, seed: int = 0, size: int = 32) -> Scene:
    """The scene of sample ``i`` (the same random draws :func:`render_shape` makes)."""
    colour_name, shape = CLASS_NAMES[label_of(i, seed)].split(" ", 1)
    s = size * _SCALE
    p = _draw_params(np.random.default_rng([seed, i]), colour_name, s)
    return Scene(colour_name, shape, p.radius / s, p.cx / s, p.cy / s, p.background)


def render_shape(i: int, seed: int = 0, size: int = 32) -> bytes:
    """PNG bytes of sample ``i`` of the stream with this seed (never corrupted)."""
    rng = np.random.default_rng([seed, i])
    label = label_of(i, seed)
    colour_name, shape = CLASS_NAMES[label].split(" ", 1)

    s = size * _SCALE
    p = _draw_params(rng, colour_name, s)
    background, fill, radius = p.background, p.fill, p.radius
    cx, cy, angle = p.cx, p.cy, p.angle

    img = Image.new("RGB", (s, s), background)
    draw = ImageDraw.Draw(img)
    if shape in ("circle", "ring"):
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
        if shape == "ring":
            r = radius * confusability(i, seed)
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=background)
    else:
        outline = _OUTLINES[shape] if shape != "cross" else _cross(confusability(i, seed))
        points = [(cx + radius * x, cy + radius * y) for x, y in _rotate(outline, angle)]
        draw.polygon(points, fill=fill)
    img = img.reduce(_SCALE)

    pixels = np.asarray(img, dtype=np.float32)
    pixels += 4.0 * rng.standard_normal(pixels.shape, dtype=np.float32)
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


# Caption vocabulary: the words the reference captions use for a scene's attributes.
_CAPTION_SHAPE_ALT = {
    "circle": "disk",
    "square": "box",
    "triangle": "triangle shape",
    "cross": "plus sign",
    "ring": "donut",
    "star": "five-pointed star",
}
_TINTS = ("pink", "green", "blue")  # a background leaning to red / green / blue


def _size_word(radius: float) -> str:
    return "small" if radius < 0.30 else "large" if radius > 0.34 else "medium-sized"


def _position_phrase(x: float, y: float) -> str:
    col = "left" if x < 0.45 else "right" if x > 0.55 else ""
    row = "top" if y < 0.45 else "bottom" if y > 0.55 else ""
    if row and col:
        return f"in the {row} {col}"
    if col:
        return f"on the {col}"
    if row:
        return f"at the {row}"
    return "in the centre"


def _background_word(rgb: tuple[int, int, int]) -> str:
    if max(rgb) - min(rgb) >= 25:
        return f"pale {_TINTS[int(np.argmax(rgb))]}"
    return "white" if sum(rgb) / 3 >= 235 else "light grey"


def captions_of(i: int, seed: int = 0, size: int = 32) -> list[str]:
    """The reference captions of sample ``i`` (:data:`N_CAPTIONS`, a pure function of
    ``(i, seed, size)``), from short to long, each true of the drawn scene:

    1. ``a red star`` — the class name;
    2. ``a small red star`` — with its size (``small`` / ``medium-sized`` / ``large``);
    3. ``a red star in the top left`` — with its position;
    4. ``a small red star on a white background`` — size and background tint;
    5. ``a picture of a red five-pointed star`` — the shape's other name.
    """
    sc = scene(i, seed, size)
    thing = f"{sc.colour} {sc.shape}"
    size_word = _size_word(sc.radius)
    return [
        f"a {thing}",
        f"a {size_word} {thing}",
        f"a {thing} {_position_phrase(sc.x, sc.y)}",
        f"a {size_word} {thing} on a {_background_word(sc.background)} background",
        f"a picture of a {sc.colour} {_CAPTION_SHAPE_ALT[sc.shape]}",
    ]


def _regular(k: int) -> list[tuple[float, float]]:
    return [
        (math.cos(2 * math.pi * j / k - math.pi / 2), math.sin(2 * math.pi * j / k - math.pi / 2))
        for j in range(k)
    ]


def _star(points: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    out = []
    for j in range(2 * points):
        r = 1.0 if j % 2 == 0 else inner
        a = math.pi * j / points - math.pi / 2
        out.append((r * math.cos(a), r * math.sin(a)))
    return out


def _cross(w: float) -> list[tuple[float, float]]:
    """A cross whose arms have half-width ``w`` (a share of the radius)."""
    return [
        (-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w),
        (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w),
    ]  # fmt: skip


_OUTLINES: dict[str, list[tuple[float, float]]] = {
    "square": [(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)],
    "triangle": _regular(3),
    "star": _star(inner=0.4),
}

# Two pairs of classes are genuinely confusable, as fine-grained classes of real benchmarks
# are: a ring's hole (its radius as a share of the outer one) ranges from plain to a dot that
# 32 px and noise all but hide (then it looks like a circle), and a cross's arms range from
# thin to so wide that only small notches tell it from a square. Drawn from their own random
# stream, so every other image is byte-identical to earlier builds.
RING_HOLE = (0.0, 0.5)
CROSS_ARM = (0.4, 1.0)


def confusability(i: int, seed: int = 0) -> float:
    """Sample ``i``'s ring hole or cross arm width (see :data:`RING_HOLE`); for other shapes
    the same draw, unused."""
    shape = CLASS_NAMES[label_of(i, seed)].split(" ", 1)[1]
    lo, hi = CROSS_ARM if shape == "cross" else RING_HOLE
    return float(np.random.default_rng([seed, i, 104729]).uniform(lo, hi))


def _rotate(points: list[tuple[float, float]], angle: float) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    return [(c * x - s * y, s * x + c * y) for x, y in points]


def _corrupt_bytes(png: bytes, k: int) -> bytes:
    """Undecodable image bytes for the ``k``-th corrupted sample, alternating two failure
    kinds: a PNG cut in half (valid header, truncated pixel data) and bytes that are not
    an image at all."""
    if k % 2 == 0:
        return png[: len(png) // 2]
    return b"this is not an image " + bytes(range(32))


def _features() -> Any:
    from datasets import ClassLabel, Features, List, Value
    from datasets import Image as ImageFeature

    return Features(
        {
            "id": Value("string"),
            "image": ImageFeature(),
            "question": Value("string"),
            "label": ClassLabel(names=CLASS_NAMES),
            "captions": List(Value("string")),
        }
    )


def _card(
    features: Any, n: int, seed: int, corrupt_every: int, size: int, n_corrupt: int, num_bytes: int
) -> str:
    import yaml

    header = {
        "dataset_info": {
            "features": features._to_yaml_list(),
            "splits": [{"name": "train", "num_bytes": num_bytes, "num_examples": n}],
        },
        "configs": [
            {"config_name": "default", "data_files": [{"split": "train", "path": _DATA_FILE}]}
        ],
    }
    return f"""---
{yaml.safe_dump(header, sort_keys=False).strip()}
---
# Coloured shapes (ICD offline fixture)

Procedural image classification: {len(CLASS_NAMES)} classes ({len(SHAPES)} shapes x
{len(COLOURS)} colours), {n} samples of {size}x{size} pixels, seed {seed}. Each sample is
a PNG with a shape of varied position, size and rotation on a tinted, lightly noisy
background, the question "{QUESTION}", the class name as label and {N_CAPTIONS} reference
captions describing the scene (colour, shape, size, position, background tint).

Every {corrupt_every}-th sample ({n_corrupt} in total; none when 0) has deliberately
undecodable image bytes, to exercise the skip path of the pipeline. Class names and
accepted synonyms are listed in `{_META_FILE}`.
"""
