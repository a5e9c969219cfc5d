"""The glyph world: a broad procedural world the student's in-context skill is meta-trained on.

It is *not* the evaluation world (:mod:`icd.data.shapes`): hundreds of categories, each a
glyph template (a jittered polygon, a star, a ring of some polygon, a cross, a cluster of
dots, a striped disc, ... with its own proportions) in one of a dozen colours, all drawn
from a seed. Images of one category vary as the shapes world's do (position, size, a slight
tilt, fill jitter, a tinted noisy background), at the same 32 px.

Categories have no names: the student's in-context episodes give them labels drawn at random
per episode from :func:`label_pool`, so a label can never be memorised and no frequency
heuristic pays — the only way to answer is to find the demonstration whose image matches the
query and read its label, the way in-context learning emerges in real VLMs.
"""

from __future__ import annotations

import colorsys
import io
import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from icd.data import shapes

N_TEMPLATES = 40
# Twelve hues round the wheel plus three muted colours: neighbours are close but separable.
HUES = [h / 12 for h in range(12)]
N_COLOURS = len(HUES) + 3
N_CATEGORIES = N_TEMPLATES * N_COLOURS
KINDS = ("polygon", "star", "ring", "cross", "dots", "stripes", "crescent")
_SCALE = 2


@dataclass(frozen=True)
class Template:
    kind: str
    points: int  # vertices, star points or dots
    ratio: float  # inner radius / arm width / hole / stripe count share, by kind
    jitter: tuple[float, ...]  # per-vertex radius factors (polygons)


def template(t: int, seed: int = 0) -> Template:
    """Glyph template ``t`` of the world drawn from ``seed``."""
    rng = np.random.default_rng([seed, 31337, t])
    kind = KINDS[t % len(KINDS)]
    points = int(rng.integers(3, 9))
    ratio = float(rng.uniform(0.25, 0.7))
    jitter = tuple(float(v) for v in rng.uniform(0.7, 1.0, size=points))
    return Template(kind, points, ratio, jitter)


def colour(c: int) -> tuple[int, int, int]:
    """RGB of colour ``c``: a hue of the wheel, or one of three muted colours."""
    if c < len(HUES):
        r, g, b = colorsys.hsv_to_rgb(HUES[c], 0.85, 0.85)
    else:
        r, g, b = [(0.45, 0.3, 0.15), (0.35, 0.35, 0.35), (0.1, 0.1, 0.1)][c - len(HUES)]
    return int(r * 255), int(g * 255), int(b * 255)


def split(category: int) -> tuple[int, int]:
    """(template, colour) of a category."""
    return divmod(category, N_COLOURS)


def render(category: int, i: int, seed: int = 0, size: int = 32) -> Image.Image:
    """Image ``i`` of ``category`` (a pure function of its arguments)."""
    t, c = split(category)
    tpl = template(t, seed)
    rng = np.random.default_rng([seed, category, i])
    s = size * _SCALE
    background = tuple(int(v) for v in rng.integers(200, 250, size=3))
    fill = tuple(int(np.clip(v + rng.integers(-25, 26), 0, 255)) for v in colour(c))
    radius = rng.uniform(0.26, 0.38) * s
    cx = rng.uniform(radius + 1, s - radius - 1)
    cy = rng.uniform(radius + 1, s - radius - 1)
    angle = rng.uniform(-0.3, 0.3)
    img = Image.new("RGB", (s, s), background)
    draw = ImageDraw.Draw(img)
    _draw(draw, tpl, cx, cy, radius, angle, fill, background)
    img = img.reduce(_SCALE)
    pixels = np.asarray(img, dtype=np.float32)
    pixels += 4.0 * rng.standard_normal(pixels.shape, dtype=np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _polygon(n: int, jitter: tuple[float, ...], angle: float) -> list[tuple[float, float]]:
    return [
        (
            jitter[j] * math.cos(2 * math.pi * j / n - math.pi / 2 + angle),
            jitter[j] * math.sin(2 * math.pi * j / n - math.pi / 2 + angle),
        )
        for j in range(n)
    ]


def _draw(draw, tpl: Template, cx, cy, r, angle, fill, background) -> None:  # noqa: ANN001
    def poly(points: list[tuple[float, float]], scale: float, colour_: tuple) -> None:
        draw.polygon([(cx + scale * x, cy + scale * y) for x, y in points], fill=colour_)

    n = tpl.points
    if tpl.kind == "polygon":
        poly(_polygon(n, tpl.jitter, angle), r, fill)
    elif tpl.kind == "star":
        pts = []
        for j in range(2 * n):
            rad = 1.0 if j % 2 == 0 else tpl.ratio
            a = math.pi * j / n - math.pi / 2 + angle
            pts.append((rad * math.cos(a), rad * math.sin(a)))
        poly(pts, r, fill)
    elif tpl.kind == "ring":
        outer = _polygon(n, (1.0,) * n, angle) if n < 7 else None
        if outer is None:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            poly(outer, r, fill)
        hole = 0.3 + 0.4 * tpl.ratio
        draw.ellipse([cx - r * hole, cy - r * hole, cx + r * hole, cy + r * hole], fill=background)
    elif tpl.kind == "cross":
        w = 0.2 + 0.4 * tpl.ratio
        arms = 4 if n < 6 else 3
        for j in range(arms):
            a = angle + math.pi * j / arms
            ca, sa = math.cos(a), math.sin(a)
            rect = [(-1, -w), (1, -w), (1, w), (-1, w)]
            poly([(ca * x - sa * y, sa * x + ca * y) for x, y in rect], r, fill)
    elif tpl.kind == "dots":
        k = 2 + n % 4
        dot = r * (0.25 + 0.2 * tpl.ratio)
        for j in range(k):
            a = angle + 2 * math.pi * j / k
            x, y = cx + (r - dot) * math.cos(a), cy + (r - dot) * math.sin(a)
            draw.ellipse([x - dot, y - dot, x + dot, y + dot], fill=fill)
    elif tpl.kind == "stripes":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        bands = 2 + n % 3
        step = 2 * r / (2 * bands + 1)
        vertical = tpl.ratio > 0.47
        for j in range(bands):
            lo = -r + step * (2 * j + 1)
            box = (
                [cx + lo, cy - r, cx + lo + step, cy + r]
                if vertical
                else [cx - r, cy + lo, cx + r, cy + lo + step]
            )
            draw.rectangle(box, fill=background)
    else:  # crescent
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        off = r * (0.3 + 0.5 * tpl.ratio)
        a = angle + 2 * math.pi * (n / 8)
        ox, oy = cx + off * math.cos(a), cy + off * math.sin(a)
        draw.ellipse([ox - r, oy - r, ox + r, oy + r], fill=background)


def png(category: int, i: int, seed: int = 0) -> bytes:
    """PNG bytes of :func:`render` (what a stream would carry)."""
    buf = io.BytesIO()
    render(category, i, seed).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def label_pool() -> tuple[list[str], list[str]]:
    """The names episode labels are drawn from, half from each list: colour-and-shape names
    of other worlds (``purple hexagon``, ``red diamond``: the form the pipeline's labels
    take) and two-word names from the tokenizers' other words (``kind phrase``) — thousands
    in all — never a class name or synonym of the shapes world, so no evaluation class is
    ever a training target."""
    from icd.models import fixtures

    taken = {n.lower() for n in shapes.CLASS_NAMES}
    taken |= {a.lower() for alts in shapes.SYNONYMS.values() for a in alts}
    things = sorted({f"{a} {b}" for a in fixtures.COLOURS for b in fixtures.SHAPES} - taken)
    words = [*fixtures.COLOURS, *fixtures.SHAPES, *fixtures._WORDS]
    other = sorted({f"{a} {b}" for a in words for b in words if a != b} - taken - set(things))
    return things, other


def draw_labels(rng: random.Random, pools: tuple[list[str], list[str]], n: int) -> list[str]:
    """``n`` distinct labels, each from either list of :func:`label_pool` at random."""
    out: list[str] = []
    while len(out) < n:
        label = rng.choice(pools[rng.random() < 0.5])
        if label not in out:
            out.append(label)
    return out
