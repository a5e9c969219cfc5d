"""Decoding and normalising images of any mode and size."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from icd.data.images import BadImage, load_image, to_rgb


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _photo(w: int = 64, h: int = 48) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "GIF"])
def test_valid_images_decode_to_rgb(fmt):
    img = load_image(_encode(_photo(), fmt))
    assert img.mode == "RGB" and img.size == (64, 48)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_images_raise(fmt):
    data = _encode(_photo(256, 256), fmt)
    for cut in (len(data) // 2, len(data) - 20):
        with pytest.raises(BadImage, match="^undecodable image: "):
            load_image(data[:cut])


@pytest.mark.parametrize("data", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\0" * 40])
def test_garbage_raises_one_line(data):
    with pytest.raises(BadImage) as e:
        load_image(data)
    assert str(e.value).startswith("undecodable image: ") and "\n" not in str(e.value)


def test_corrupted_png_body_raises():
    data = bytearray(_encode(_photo(), "PNG"))
    data[60:80] = b"\xff" * 20  # inside the image data chunk: CRC no longer matches
    with pytest.raises(BadImage):
        load_image(bytes(data))


def test_transparent_pixels_become_white():
    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    out = load_image(_encode(rgba, "PNG"))
    assert out.mode == "RGB"
    assert out.getpixel((5, 5)) == (255, 255, 255) and out.getpixel((0, 0)) == (255, 0, 0)


@pytest.mark.parametrize(
    "img",
    [
        Image.new("L", (20, 10), 128),
        Image.new("1", (20, 10), 1),
        Image.new("LA", (20, 10), (0, 0)),
        Image.new("CMYK", (20, 10), (0, 255, 255, 0)),
        Image.new("YCbCr", (20, 10), (128, 128, 128)),
        Image.new("F", (20, 10), 3.5),
        Image.new("I", (20, 10), 70000),
        Image.fromarray(np.arange(200, dtype=np.uint16).reshape(10, 20) * 300),  # I;16
    ],
    ids=lambda im: im.mode,
)
def test_every_mode_converts_to_rgb(img):
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == img.size


def test_sixteen_bit_range_is_rescaled_not_clipped():
    arr = (np.arange(200, dtype=np.uint16).reshape(10, 20) * 300).astype(np.uint16)
    out = np.asarray(to_rgb(Image.fromarray(arr)))[..., 0]
    assert out.min() == 0 and out.max() == 255  # clipping would leave almost all pixels at 255


def test_palette_with_transparency():
    p = Image.new("P", (8, 8), 0)
    p.putpalette([0, 255, 0] * 256)
    p.info["transparency"] = 0
    out = load_image(_encode(p, "PNG"))
    assert out.getpixel((0, 0)) == (255, 255, 255)


def test_huge_images_are_downsized_keeping_aspect():
    big = Image.new("RGB", (4000, 1000), (10, 20, 30))
    out = load_image(_encode(big, "PNG"), max_side=1024)
    assert out.size == (1024, 256)
    small = _photo()
    assert to_rgb(small, max_side=1024) is small


@settings(max_examples=30, deadline=None)
@given(
    w=st.integers(1, 600),
    h=st.integers(1, 600),
    mode=st.sampled_from(["RGB", "RGBA", "L", "P", "CMYK", "LA", "I", "F"]),
    max_side=st.integers(8, 256),
)
def test_to_rgb_bounds_size_and_mode(w, h, mode, max_side):
    out = to_rgb(Image.new(mode, (w, h)), max_side=max_side)
    assert out.mode == "RGB" and max(out.size) <= max(max_side, 1) and min(out.size) >= 1
    if max(w, h) <= max_side:
        assert out.size == (w, h)
    else:
        assert abs(out.width / out.height - w / h) <= max(w / h, h / w) * 2 / min(out.size)
