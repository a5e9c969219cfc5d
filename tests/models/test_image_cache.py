"""The HF backend's processed-image cache (:mod:`icd.models.image_cache`): answers and
processor outputs identical with and without it, each image processed once per option set,
memory bounded, and a layout that does not match the image processor turns it off."""

from __future__ import annotations

import copy
import logging
import pickle

import numpy as np
import pytest
from PIL import Image

from icd.bench.student import icl_prompts
from icd.models.fixtures import STUDENT, TEACHER
from icd.models.hf import HFVLM
from icd.models.image_cache import CachedImageProcessor, install, layout_of

SPLIT = {"do_image_splitting": True, "size": {"longest_edge": 64}}  # 2x2 crops + global


def _prompts() -> list:
    """ICL prompts with 0 to 3 demos, so batches mix image counts; demos repeat."""
    return [*icl_prompts(6, k=0, seed=1), *icl_prompts(10, k=3), *icl_prompts(8, k=1, seed=2)]


def _same(a: list, b: list) -> bool:
    return all(
        x.text == y.text
        and x.prompt_tokens == y.prompt_tokens
        and np.array_equal(x.token_logprobs, y.token_logprobs)
        and np.array_equal(x.token_entropy, y.token_entropy)
        and x.first_top2 == y.first_top2
        for x, y in zip(a, b, strict=True)
    )


@pytest.mark.parametrize(
    ("name", "options"), [(STUDENT, {}), (STUDENT, SPLIT), (TEACHER, {})], ids=["idefics3", "idefics3-split", "llava"]
)  # fmt: skip
def test_answers_identical_with_and_without_the_cache(fixture_paths, name, options) -> None:
    path = str(fixture_paths[name])
    plain = HFVLM(path, batch_size=5, max_new_tokens=5, processor_kwargs=options)
    cached = HFVLM(
        path, batch_size=5, max_new_tokens=5, processor_kwargs=options, image_cache_mb=64
    )
    assert plain.image_cache is None and isinstance(cached.image_cache, CachedImageProcessor)
    prompts = _prompts()
    reference = plain.generate(prompts)
    assert _same(cached.generate(prompts), reference)  # first pass: verified, then assembled
    misses = cached.image_cache.misses
    assert _same(cached.generate(prompts), reference)  # second pass: every image cached
    stats = cached.image_cache.stats()
    assert stats["enabled"] and stats["misses"] == misses and stats["hits"] > 0
    images = sum(len(p.images) for p in prompts)
    assert misses < images  # repeated demos and queries were processed once


def _processor_outputs(vlm: HFVLM, prompts: list, **options) -> dict:
    texts = [
        vlm.processor.apply_chat_template(p.messages, add_generation_prompt=True, tokenize=False)
        for p in prompts
    ]
    out = vlm.processor(
        text=texts, images=[p.images for p in prompts], padding=True, return_tensors="pt", **options
    )
    return {k: v.numpy() for k, v in out.items()}


def test_changed_processor_options_get_their_own_entries(fixture_paths) -> None:
    """The same images under other options (image splitting on) are processed again and
    give that option's outputs, not the cached ones."""
    vlm = HFVLM(str(fixture_paths[STUDENT]), image_cache_mb=64)
    cache = vlm.image_cache
    prompts = icl_prompts(4, k=2)
    whole = _processor_outputs(vlm, prompts)
    entries = cache.stats()["entries"]
    split = _processor_outputs(vlm, prompts, **SPLIT)
    assert cache.stats()["entries"] == 2 * entries
    cache.enabled = False  # the processor's own outputs, for reference
    for options, got in (({}, whole), (SPLIT, split)):
        want = _processor_outputs(vlm, prompts, **options)
        assert want.keys() == got.keys()
        assert all(np.array_equal(want[k], got[k]) for k in want)
    assert split["pixel_values"].shape[1] > whole["pixel_values"].shape[1]  # crops


def test_memory_is_bounded_least_recently_used_first(fixture_paths) -> None:
    vlm = HFVLM(str(fixture_paths[STUDENT]), image_cache_mb=64)
    cache = vlm.image_cache
    prompts = icl_prompts(12, k=3)
    _processor_outputs(vlm, prompts)
    per_image = cache.bytes // cache.stats()["entries"]
    cache.max_bytes = 5 * per_image  # room for five images
    cache._entries.clear()
    cache.bytes = 0
    got = _processor_outputs(vlm, prompts)
    assert cache.bytes <= cache.max_bytes and cache.stats()["entries"] == 5
    assert cache.evictions > 0
    cache.enabled = False
    want = _processor_outputs(vlm, prompts)
    assert all(np.array_equal(want[k], got[k]) for k in want)


def test_a_layout_that_does_not_match_turns_the_cache_off(fixture_paths, caplog) -> None:
    vlm = HFVLM(str(fixture_paths[STUDENT]))
    wrong = CachedImageProcessor(vlm.processor.image_processor, layout="concat", max_bytes=2**26)
    vlm.processor.image_processor = wrong
    prompts = icl_prompts(3, k=2)
    with caplog.at_level(logging.WARNING, logger="icd.models.image_cache"):
        got = _processor_outputs(vlm, prompts)
    assert not wrong.enabled and "image cache off" in caplog.text
    vlm.processor.image_processor = wrong.wrapped
    want = _processor_outputs(vlm, prompts)
    assert all(np.array_equal(want[k], got[k]) for k in want)  # the processor's own outputs


def test_outputs_it_cannot_assemble_turn_the_cache_off(fixture_paths, caplog) -> None:
    """Idefics3 with padding off returns no pixel_attention_mask: not the cached layout.
    The call still gets the processor's own outputs."""
    inner = HFVLM(str(fixture_paths[STUDENT])).processor.image_processor
    cached = CachedImageProcessor(inner, layout="padded_crops", max_bytes=2**26)
    images = [p.images for p in icl_prompts(3, k=1)]
    options = {"return_tensors": "pt", "do_pad": False, "return_row_col_info": True}
    with caplog.at_level(logging.WARNING, logger="icd.models.image_cache"):
        got = cached(images, **options)
    assert not cached.enabled and "cannot assemble it: KeyError" in caplog.text
    want = inner(images, **options)
    assert want.keys() == got.keys() and all(np.array_equal(want[k], got[k]) for k in want)


def test_layouts_by_image_processor_class() -> None:
    from transformers import Qwen2VLImageProcessorPil

    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        for h, w in [(56, 84), (112, 56), (28, 28)]
    ]
    inner = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=112 * 112)
    assert layout_of(inner) == "concat"
    cached = CachedImageProcessor(inner, layout="concat", max_bytes=2**26)
    nested = [[images[0], images[1]], [images[2]], [images[0]]]
    want = inner(nested, return_tensors="pt")
    for _ in range(2):  # the checked first call, then one assembled from the cache
        got = cached(nested, return_tensors="pt")
        assert all(np.array_equal(want[k].numpy(), got[k].numpy()) for k in want)
    assert cached.enabled and cached.misses == 3 and cached.hits == 5

    class Unknown:
        image_processor = object()

    assert install(Unknown(), max_mb=64) is None


def test_llava_onevision_patches_an_image_alone_and_not_one_among_several() -> None:
    """Its image processor splits an image into anyres patches only when it is the only
    image of its prompt: the same image alone and in an ICL prompt are cached apart."""
    from transformers import LlavaOnevisionImageProcessorPil

    rng = np.random.default_rng(1)
    wide, tall, small = (
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        for h, w in [(100, 800), (300, 120), (64, 64)]
    )
    inner = LlavaOnevisionImageProcessorPil()
    assert layout_of(inner) == "padded_patches"
    cached = CachedImageProcessor(inner, layout="padded_patches", max_bytes=2**28)
    for nested in ([[wide, tall], [small]], [[wide]], [[small], [tall, wide, small]]):
        want = inner(nested, return_tensors="pt")
        for _ in range(2):
            got = cached(nested, return_tensors="pt")
            assert want.keys() == got.keys()
            assert all(np.array_equal(want[k].numpy(), got[k].numpy()) for k in want)
    assert cached.enabled and cached.stats()["entries"] == 5  # wide twice, small twice, tall


def test_the_processor_saves_copies_and_pickles_as_without_the_cache(
    fixture_paths, tmp_path
) -> None:
    """transformers deep-copies a processor's parts for to_dict, repr and save_pretrained:
    those see the wrapped image processor, and the saved files are the same as without."""
    plain = HFVLM(str(fixture_paths[STUDENT]))
    cached = HFVLM(str(fixture_paths[STUDENT]), image_cache_mb=64)
    plain.processor.save_pretrained(tmp_path / "plain")
    cached.processor.save_pretrained(tmp_path / "cached")
    for f in (tmp_path / "plain").iterdir():
        assert (tmp_path / "cached" / f.name).read_bytes() == f.read_bytes(), f.name
    assert "CachedImageProcessor(layout='padded_crops'" in repr(cached.processor)
    inner = type(plain.processor.image_processor)
    assert type(copy.deepcopy(cached.processor.image_processor)) is inner
    assert type(pickle.loads(pickle.dumps(cached.processor)).image_processor) is inner
