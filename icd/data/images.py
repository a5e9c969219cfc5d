"""Safe image decoding and normalisation for every backend.

``load_image`` turns raw bytes into an RGB ``PIL.Image`` whose longest side is at most
``max_side``, or raises :class:`BadImage` with a one-line reason the caller can record as
the sample's skip reason. ``to_rgb`` does the same conversion for an already decoded image.
"""

from __future__ import annotations

import hashlib
import io
import warnings

from PIL import Image, ImageFile

MAX_SIDE = 1024
# Refuse decompression bombs early instead of allocating gigabytes (PIL's own limit is a warning).
MAX_PIXELS = 16_000 * 16_000


class BadImage(ValueError):
    """An image that cannot be decoded; ``str(e)`` is a one-line reason."""


def load_image(data: bytes, max_side: int = MAX_SIDE) -> Image.Image:
    """Decode ``data`` fully into an RGB image with longest side <= ``max_side``.

    Raises :class:`BadImage` ("undecodable image: ...") for empty, garbage or truncated
    bytes and for images larger than ``MAX_PIXELS``; never returns a partially decoded image.
    """
    if not data:
        raise BadImage("undecodable image: empty bytes")
    # A truncated file must fail, whatever another library set this global to.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                probe.verify()  # structural check (e.g. PNG chunk CRCs); consumes the file
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > MAX_PIXELS:
                raise BadImage(f"undecodable image: {img.width}x{img.height} is too large")
            img.load()  # full decode: truncated pixel data raises here
    except BadImage:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ...
        reason = " ".join(str(e).split()) or type(e).__name__
        raise BadImage(f"undecodable image: {reason}") from None
    return to_rgb(img, max_side)


def to_rgb(img: Image.Image, max_side: int = MAX_SIDE) -> Image.Image:
    """Return ``img`` as RGB with longest side <= ``max_side`` (aspect ratio kept).

    Transparent images (RGBA, LA, P with transparency) are composited on white; L, 1, P,
    CMYK, YCbCr, I, I;16, F and other modes are converted. An RGB image already small enough
    is returned unchanged (same object).
    """
    if img.mode != "RGB":
        img = _convert(img)
    if max(img.size) > max_side:
        scale = max_side / max(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    return img


def _convert(img: Image.Image) -> Image.Image:
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "RGBa", "La", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # High bit-depth greyscale: rescale the actual range to 0..255 before converting.
        lo, hi = _band_range(img)
        if hi > lo:
            scale = 255.0 / (hi - lo)
            img = (
                img.point(lambda v: (v - lo) * scale)
                if img.mode in ("I", "F")
                else _scale16(img, lo, hi)
            )
        else:
            img = Image.new("L", img.size, 0 if hi <= 0 else 255)
        return img.convert("L").convert("RGB")
    return img.convert("RGB")


def _scale16(img: Image.Image, lo: float, hi: float) -> Image.Image:
    """Rescale a 16-bit image to 8-bit via mode "I" (point() does not accept I;16 lambdas)."""
    wide = img.convert("I")
    scale = 255.0 / (hi - lo)
    return wide.point(lambda v: (v - lo) * scale)


def image_id(sample_id: str, data: bytes) -> str:
    """A stable name for a sample's image: its sample id and a digest of its encoded bytes
    (``SAMPLE_ID-HEX12``), so the same image has the same id in every prompt and run, and
    another image under a reused sample id (another dataset, a rebuilt fixture) does not."""
    return f"{sample_id}-{hashlib.sha256(data).hexdigest()[:12]}"


def _band_range(img: Image.Image) -> tuple[float, float]:
    """(min, max) of a single-band image."""
    lo, hi = img.getextrema()
    if isinstance(lo, tuple) or isinstance(hi, tuple):  # several bands: not this image's mode
        raise BadImage(f"mode {img.mode} has more than one band")
    return lo, hi
