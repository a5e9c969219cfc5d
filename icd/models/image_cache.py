"""The Hugging Face backend's processed-image cache.

Each pool image is shown again as a demonstration in dozens of prompts, and each query image
is processed twice (its zero-shot prompt, then its ICL prompt); the image processor would
resize, split, rescale and normalise it every time (SmolVLM with image splitting: about a
second of CPU per image). :class:`CachedImageProcessor` stands in for a processor's
``image_processor``: each distinct image (by a digest of its pixels) under each set of
call options is processed once, alone, and a batch is assembled from the cached pieces
the way the image processor's own batch call lays it out. The processor's text side (chat
template, image-token expansion, tokenisation) is unchanged: it reads the same outputs.

Three layouts are known, by image processor class (:data:`LAYOUTS`):

- ``concat``: every output is per image along the first axis, concatenated in image order
  (CLIP / SigLIP, as in LLaVA; Qwen2-VL / Qwen2.5-VL: ``pixel_values`` rows and
  ``image_grid_thw``).
- ``padded_crops`` (Idefics3, SmolVLM): per prompt, its images' crops in order, padded with
  zeros to the batch's largest crop count and crop size, ``pixel_attention_mask`` alike;
  ``rows`` / ``cols`` per image.
- ``padded_patches`` (LLaVA-OneVision): per image its anyres patches, padded with zeros to
  the batch's most patches, ``image_sizes`` per image, ``batch_num_images`` per prompt. An
  image alone in its prompt is split into patches, one among several is not (as the image
  processor does): the two are cached apart.

The assembly is checked once per option set against the image processor's own output for
the first batch: any difference, or outputs it cannot assemble (another layout, e.g. with
padding off), turns the cache off (a warning says so), so a checkpoint
whose image processor behaves otherwise keeps its exact outputs. Memory is bounded: the
least recently used entries go once the cached arrays pass ``max_bytes``. An image
processor of another class is left as it is (:func:`install` returns None).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, TypedDict

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

LAYOUTS: dict[str, str] = {
    "Idefics3ImageProcessor": "padded_crops",
    "SmolVLMImageProcessor": "padded_crops",
    "CLIPImageProcessor": "concat",
    "SiglipImageProcessor": "concat",
    "Qwen2VLImageProcessor": "concat",
    "LlavaOnevisionImageProcessor": "padded_patches",
}
_LAYOUT_NAMES = ("concat", "padded_crops", "padded_patches")
_SUFFIXES = ("Pil", "Fast")


def layout_for(class_name: str) -> str | None:
    """The batch layout of the image processor class named ``class_name`` (its ``Pil`` and
    ``Fast`` variants included; None: not one this cache knows)."""
    for suffix in _SUFFIXES:
        class_name = class_name.removesuffix(suffix)
    return LAYOUTS.get(class_name)


def layout_of(image_processor: Any) -> str | None:
    """The batch layout of ``image_processor``'s class (None: not one this cache knows)."""
    return layout_for(type(image_processor).__name__)


def image_digest(image: Any) -> bytes:
    """A digest of an image's pixels, mode and size (a PIL image, or an array)."""
    if isinstance(image, Image.Image):
        data, meta = image.tobytes(), f"{image.mode}{image.size}"
    else:
        arr = np.ascontiguousarray(_array(image))
        data, meta = arr.tobytes(), f"{arr.dtype}{arr.shape}"
    return hashlib.blake2b(data, digest_size=16).digest() + meta.encode()


def _array(v: Any) -> np.ndarray:
    if hasattr(v, "detach"):  # a torch tensor
        return v.detach().cpu().numpy()
    return np.asarray(v)


# One image's outputs as the image processor names them: arrays (leading axis: batch of
# one) and nested lists (Idefics3's crop rows/cols); the keys depend on the processor.
_Entry = dict[str, Any]


class CacheStats(TypedDict):
    hits: int
    misses: int
    evictions: int
    entries: int
    bytes: int
    enabled: bool


class CachedImageProcessor:
    """``image_processor`` with its per-image work cached (see the module docstring); every
    other attribute is the wrapped processor's. Thread-safe."""

    def __init__(self, image_processor: Any, *, layout: str, max_bytes: int) -> None:
        if layout not in _LAYOUT_NAMES:
            raise ValueError(f"unknown layout {layout!r}")
        self.wrapped = image_processor
        self.layout = layout
        self.max_bytes = max_bytes
        self.enabled = True
        self.hits = self.misses = self.evictions = self.bytes = 0
        self._entries: OrderedDict[tuple[str, bytes], tuple[_Entry, int]] = OrderedDict()
        self._verified: set[str] = set()
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        if name == "wrapped":  # not set yet (an object being copied): no recursion
            raise AttributeError(name)
        return getattr(self.wrapped, name)

    # A copy (the processor's to_dict, repr and save_pretrained deep-copy their parts) or a
    # pickle is the wrapped image processor itself: the cache stays with this process.
    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return copy.deepcopy(self.wrapped, memo)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_itself, (self.wrapped,))

    def __repr__(self) -> str:
        return (
            f"CachedImageProcessor(layout={self.layout!r}, max_bytes={self.max_bytes}, "
            f"entries={len(self._entries)}, enabled={self.enabled}) over {self.wrapped!r}"
        )

    def stats(self) -> CacheStats:
        """Hits, misses, evictions, cached entries and bytes, and whether it is on."""
        return {
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "entries": len(self._entries),
            "bytes": self.bytes,
            "enabled": self.enabled,
        }

    def __call__(self, images: Any, **kwargs: Any) -> Any:
        nested = _nested(images)
        if not self.enabled or nested is None or not any(nested):
            return self.wrapped(images, **kwargs)
        options = self._options(kwargs)
        with self._lock:
            entries = [
                [self._entry(im, options, kwargs, alone=len(row) == 1) for im in row]
                for row in nested
            ]
            if options in self._verified:
                return self._assemble(entries, kwargs.get("return_tensors"))
            real = self.wrapped(images, **kwargs)
            try:
                assembled = self._assemble(entries, kwargs.get("return_tensors"))
                difference = _difference(real, assembled)
            except (KeyError, IndexError, ValueError, TypeError) as e:  # not this layout
                difference = f"cannot assemble it: {type(e).__name__} {e}"
            if difference is None:
                self._verified.add(options)
            else:
                self.enabled = False
                self._entries.clear()
                self.bytes = 0
                log.warning(
                    "image cache off for %s: the cached batch differs from the processor's "
                    "own (%s); every image is processed again",
                    type(self.wrapped).__name__,
                    difference,
                )
            return real

    # ---------------------------------------------------------------- internals
    def _options(self, kwargs: Mapping[str, object]) -> str:
        """What, besides the pixels, decides an image's outputs: the call's options and the
        image processor's own settings."""
        call = {k: v for k, v in kwargs.items() if k != "return_tensors"}
        return json.dumps([call, self.wrapped.to_dict()], sort_keys=True, default=repr)

    def _entry(
        self, image: Any, options: str, kwargs: Mapping[str, object], *, alone: bool
    ) -> _Entry:
        """One image's outputs (cached); ``alone``: the only image of its prompt."""
        context = "" if self.layout != "padded_patches" else "alone" if alone else "among"
        key = (options + context, image_digest(image))
        found = self._entries.get(key)
        if found is not None:
            self._entries.move_to_end(key)
            self.hits += 1
            return found[0]
        self.misses += 1
        if self.layout == "concat":
            out = self.wrapped([image], **kwargs)
        elif self.layout == "padded_patches" and not alone:  # as one of two: not patched
            out = self.wrapped([[image, image]], **kwargs)
        else:
            out = self.wrapped([[image]], **kwargs)
        entry = {k: (v if isinstance(v, list) else _array(v)) for k, v in out.items()}
        if self.layout == "padded_patches":
            entry = {k: entry[k][:1] for k in ("pixel_values", "image_sizes")}
        size = sum(v.nbytes for v in entry.values() if isinstance(v, np.ndarray))
        if size <= self.max_bytes:
            self._entries[key] = (entry, size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (_, dropped) = self._entries.popitem(last=False)
                self.bytes -= dropped
                self.evictions += 1
        return entry

    def _assemble(self, entries: list[list[_Entry]], return_tensors: Any) -> Any:
        from transformers import BatchFeature

        flat = [e for row in entries for e in row]
        lists: dict[str, list[list[int]]] = {}
        if self.layout == "concat":
            data = {k: np.concatenate([e[k] for e in flat]) for k in flat[0]}
        elif self.layout == "padded_patches":
            data = _padded_patches(entries)
        else:
            data, lists = _padded_crops(entries)
        out = BatchFeature(data=data, tensor_type=return_tensors)
        for k, v in lists.items():  # as the image processor adds them: not as tensors
            out[k] = v
        return out


def _itself(value: Any) -> Any:
    return value


def _nested(images: Any) -> list[list[Any]] | None:
    """``images`` as one list of images per prompt (None: another structure)."""
    if not isinstance(images, (list, tuple)):
        return None
    if all(isinstance(row, (list, tuple)) for row in images):
        return [list(row) for row in images]
    if all(isinstance(im, Image.Image) for im in images):
        return [list(images)]
    return None


def _padded_crops(
    entries: list[list[_Entry]],
) -> tuple[dict[str, np.ndarray], dict[str, list[list[int]]]]:
    """Idefics3's batch: each prompt's crops in order, zero-padded to the batch's most crops
    and largest crop (bottom/right, as the image processor pads), masks alike."""
    flat = [e for row in entries for e in row]
    pixels = [e["pixel_values"][0] for e in flat]  # [crops, C, H, W]
    n_max = max(sum(e["pixel_values"].shape[1] for e in row) for row in entries)
    height = max(p.shape[2] for p in pixels)
    width = max(p.shape[3] for p in pixels)
    channels = pixels[0].shape[1]
    values = np.zeros((len(entries), n_max, channels, height, width), pixels[0].dtype)
    mask_dtype = flat[0]["pixel_attention_mask"].dtype
    masks = np.zeros((len(entries), n_max, height, width), mask_dtype)
    for i, row in enumerate(entries):
        j = 0
        for e in row:
            p, m = e["pixel_values"][0], e["pixel_attention_mask"][0]
            n, _, h, w = p.shape
            values[i, j : j + n, :, :h, :w] = p
            masks[i, j : j + n, :h, :w] = m
            j += n
    lists: dict[str, list[list[int]]] = {
        k: [[e[k][0][0] for e in row] for row in entries] for k in ("rows", "cols") if k in flat[0]
    }
    return {"pixel_values": values, "pixel_attention_mask": masks}, lists


def _padded_patches(entries: list[list[_Entry]]) -> dict[str, np.ndarray]:
    """LLaVA-OneVision's batch: every image's patches, zero-padded to the batch's most
    patches; its size; each prompt's image count."""
    flat = [e for row in entries for e in row]
    pixels = [e["pixel_values"][0] for e in flat]  # [patches, C, H, W]
    n_max = max(p.shape[0] for p in pixels)
    values = np.zeros((len(pixels), n_max, *pixels[0].shape[1:]), pixels[0].dtype)
    for i, p in enumerate(pixels):
        values[i, : p.shape[0]] = p
    return {
        "pixel_values": values,
        "image_sizes": np.concatenate([e["image_sizes"] for e in flat]),
        "batch_num_images": np.array([len(row) for row in entries]),
    }


def _difference(real: Any, assembled: Any) -> str | None:
    """What differs between two image-processor outputs (None: nothing)."""
    if set(real.keys()) != set(assembled.keys()):
        return f"keys {sorted(real.keys())} vs {sorted(assembled.keys())}"
    for k in real:
        a, b = real[k], assembled[k]
        if isinstance(a, list) or isinstance(b, list):
            if a != b:
                return f"{k} differs"
            continue
        if type(a) is not type(b):
            return f"{k}: {type(a).__name__} vs {type(b).__name__}"
        x, y = _array(a), _array(b)
        if x.dtype != y.dtype or x.shape != y.shape or not np.array_equal(x, y):
            return f"{k}: {x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)} or values"
    return None


def install(processor: Any, *, max_mb: float) -> CachedImageProcessor | None:
    """Put a :class:`CachedImageProcessor` of at most ``max_mb`` MB in place of
    ``processor.image_processor`` and return it; None (nothing changed) when ``max_mb`` is 0,
    the processor has no image processor, or its class has no known layout."""
    inner = getattr(processor, "image_processor", None)
    layout = layout_of(inner) if inner is not None else None
    if max_mb <= 0 or layout is None:
        if inner is not None and max_mb > 0:
            log.info("image cache: %s has no known batch layout; off", type(inner).__name__)
        return None
    cached = CachedImageProcessor(inner, layout=layout, max_bytes=int(max_mb * 2**20))
    processor.image_processor = cached
    return cached
