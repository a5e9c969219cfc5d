"""HFVLM and HFEmbedder on the tiny real-architecture fixtures."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from icd.config import ModelConfig
from icd.data.types import Sample
from icd.method.types import Prompt
from icd.models import ModelLoadError, clear_cache, load_embedder, load_student, load_teacher
from icd.models.base import Embedder, Sampling, Student, Teacher
from icd.models.fixtures import EMBEDDER, STUDENT, TEACHER
from icd.models.hf import HFVLM, HFEmbedder

from .conftest import QUESTION, icl_prompt, random_image


def _raw_greedy_tokens(vlm: HFVLM, prompt: Prompt, max_new_tokens: int) -> list[int]:
    """The answer's token ids straight from ``model.generate``, up to the first EOS."""
    text = vlm.processor.apply_chat_template(prompt.messages, add_generation_prompt=True)
    enc = vlm.processor(text=[text], images=[prompt.images], return_tensors="pt")
    with torch.inference_mode():
        seq = vlm.model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=vlm.pad_id
        )
    ids = seq[0, enc["input_ids"].shape[1] :].tolist()
    stops = {*vlm.eos_ids, vlm.pad_id}
    return ids[: next((i for i, t in enumerate(ids) if t in stops), len(ids))]


def test_icl_prompt_with_three_images_gives_answer_and_token_stats(vlm):
    prompt = icl_prompt(1, k=2)
    assert len(prompt.images) == 3
    [gen] = vlm.generate([prompt])
    n_tokens = len(_raw_greedy_tokens(vlm, prompt, vlm.max_new_tokens))
    assert len(gen.token_logprobs) == len(gen.token_entropy) == n_tokens
    assert np.all(np.isfinite(gen.token_logprobs)) and np.all(gen.token_logprobs <= 0)
    vocab = vlm.model.get_output_embeddings().weight.shape[0]
    assert np.all(gen.token_entropy >= 0) and np.all(gen.token_entropy <= math.log(vocab) + 1e-4)
    p1, p2 = gen.first_top2
    assert 1.0 >= p1 >= p2 >= 0.0 and p1 + p2 <= 1.0 + 1e-6
    assert gen.text == gen.text.strip()


def test_prompt_goes_through_the_chat_template_with_interleaved_images(vlm):
    prompt = icl_prompt(2, k=2, labels=("red circle", "blue star"))
    text = vlm.processor.apply_chat_template(prompt.messages, add_generation_prompt=True)
    # demos keep their order and answers; the query is the last, open turn
    assert text.index("red circle") < text.index("blue star")
    assert text.count(QUESTION) == 3
    assert not text.rstrip().endswith("star")


def test_greedy_decoding_is_deterministic(vlm):
    prompts = [icl_prompt(s, k=s % 3) for s in range(3)]
    a, b = vlm.generate(prompts), vlm.generate(prompts)
    assert [g.text for g in a] == [g.text for g in b]
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.token_logprobs, y.token_logprobs)


def test_batched_and_one_by_one_generation_agree(vlm):
    # different numbers of images and prompt lengths in one batch: left padding must not leak
    prompts = [icl_prompt(10 + s, k=s % 3) for s in range(6)]
    batched = vlm.with_settings(batch_size=6, max_new_tokens=8).generate(prompts)
    single = [vlm.generate([p])[0] for p in prompts]
    assert [g.text for g in batched] == [g.text for g in single]
    for x, y in zip(batched, single, strict=True):
        assert len(x.token_logprobs) == len(y.token_logprobs)
        np.testing.assert_allclose(x.token_logprobs, y.token_logprobs, atol=1e-4)
    assert vlm.tokenizer.padding_side == "left"


def test_concurrent_calls_from_threads_match_sequential(vlm):
    from concurrent.futures import ThreadPoolExecutor

    prompts = [icl_prompt(80 + s, k=s % 3) for s in range(4)]
    expected = [g.text for g in vlm.generate(prompts)]
    other_view = vlm.with_settings(batch_size=2, max_new_tokens=8)
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(m.generate, prompts) for m in (vlm, other_view) * 3]
        results = [[g.text for g in f.result()] for f in futures]
    assert all(r == expected for r in results)


def test_max_new_tokens_bounds_the_answer(vlm):
    gens = vlm.generate([icl_prompt(3, k=1)], max_new_tokens=2)
    assert len(gens[0].token_logprobs) <= 2


def test_generate_preserves_order_across_internal_batches(vlm):
    prompts = [icl_prompt(20 + s, k=1) for s in range(5)]  # batch_size 4: two batches
    together = vlm.generate(prompts)
    reverse = vlm.generate(prompts[::-1])[::-1]
    assert [g.text for g in together] == [g.text for g in reverse]


def test_text_only_prompt(vlm):
    prompt = Prompt(messages=[{"role": "user", "content": [{"type": "text", "text": QUESTION}]}])
    [gen] = vlm.generate([prompt])
    assert len(gen.token_logprobs) <= vlm.max_new_tokens


def _samples(n: int) -> list[Sample]:
    return [
        Sample(sample_id=f"s{i}", stream_pos=i, question=QUESTION, answers=["red circle"])
        for i in range(n)
    ]


def test_annotate_greedy_first_then_reproducible_samples(vlm):
    # The untrained build of the same architecture: the trained mini-world teacher is sure
    # enough of its answers that every seed draws the same ones.
    from icd.models.fixtures import build_model_fixtures, fixtures_dir

    name = vlm.model_id.removeprefix("fixtures/")
    untrained = build_model_fixtures(fixtures_dir(), names=[name])[name]
    vlm = HFVLM(str(untrained), batch_size=4, max_new_tokens=8)
    samples, prompts = _samples(3), [icl_prompt(30 + s, k=1) for s in range(3)]
    anns = vlm.annotate(samples, prompts, Sampling(5, 1.0, True, 7))
    again = vlm.annotate(samples, prompts, Sampling(5, 1.0, True, 7))
    other = vlm.annotate(samples, prompts, Sampling(5, 1.0, True, 8))
    greedy = vlm.generate(prompts)
    texts = [[g.text for g in a.generations] for a in anns]
    assert all(a.error is None and len(a.generations) == 5 for a in anns)
    assert [t[0] for t in texts] == [g.text for g in greedy]
    assert texts == [[g.text for g in a.generations] for a in again]
    assert texts != [[g.text for g in a.generations] for a in other]
    # a random tiny model at T=1 practically never repeats its greedy answer 4 times
    assert any(len(set(t[1:])) > 1 for t in texts)


def test_sampled_answers_do_not_depend_on_batching(vlm):
    samples, prompts = _samples(4), [icl_prompt(70 + s, k=s % 3) for s in range(4)]
    sampling = Sampling(4, 1.0, False, 3)
    together = vlm.with_settings(batch_size=4, max_new_tokens=8).annotate(
        samples, prompts, sampling
    )
    alone = [vlm.annotate([s], [p], sampling)[0] for s, p in zip(samples, prompts, strict=True)]
    reordered = vlm.annotate(samples[::-1], prompts[::-1], sampling)[::-1]
    texts = [[g.text for g in a.generations] for a in together]
    assert texts == [[g.text for g in a.generations] for a in alone]
    assert texts == [[g.text for g in a.generations] for a in reordered]


def test_sampled_token_stats_come_from_the_unwarped_distribution(vlm):
    # The first step's distribution does not depend on what gets sampled: a sample drawn
    # at a low temperature must report the same first-step entropy as the greedy answer.
    [prompt] = [icl_prompt(40, k=2)]
    [ann] = vlm.annotate(_samples(1), [prompt], Sampling(3, 0.3, True, 1))
    greedy, *sampled = ann.generations
    for g in sampled:
        if len(g.token_entropy) and len(greedy.token_entropy):
            assert g.token_entropy[0] == pytest.approx(greedy.token_entropy[0], abs=1e-5)
            assert g.first_top2 == pytest.approx(greedy.first_top2, abs=1e-6)


def test_annotate_without_greedy_and_at_zero_temperature(vlm):
    samples, prompts = _samples(2), [icl_prompt(50 + s, k=0) for s in range(2)]
    anns = vlm.annotate(samples, prompts, Sampling(3, 0.8, False, 0))
    assert [len(a.generations) for a in anns] == [3, 3]
    cold = vlm.annotate(samples, prompts, Sampling(3, 0.0, False, 0))
    greedy = vlm.generate(prompts)
    assert [[g.text for g in a.generations] for a in cold] == [[g.text] * 3 for g in greedy]


def test_annotate_records_a_bad_sample_and_keeps_the_rest(vlm):
    samples, prompts = _samples(3), [icl_prompt(60 + s, k=1) for s in range(3)]
    broken = Prompt(messages=prompts[1].messages, images=prompts[1].images[:1])  # 2 slots, 1 image
    anns = vlm.annotate(samples, [prompts[0], broken, prompts[2]], Sampling(2, 1.0, True, 0))
    assert anns[1].error and "\n" not in anns[1].error and anns[1].generations == []
    assert anns[0].error is None and anns[2].error is None
    alone = vlm.annotate(samples[2:], prompts[2:], Sampling(2, 1.0, True, 0))
    assert anns[2].generations[0].text == alone[0].generations[0].text


# ------------------------------------------------------------------------ embedder


def test_embeddings_are_unit_norm_with_one_dim(embedder):
    imgs = embedder.embed_images([random_image(s, size=(30 + 7 * s, 50)) for s in range(5)])
    txts = embedder.embed_texts(["red circle", "a large blue hexagon", "x"])
    assert imgs.dtype == txts.dtype == np.float32
    assert imgs.shape == (5, embedder.dim) and txts.shape == (3, embedder.dim)
    np.testing.assert_allclose(np.linalg.norm(imgs, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(txts, axis=1), 1.0, atol=1e-5)
    assert embedder.embed_texts([]).shape == (0, embedder.dim)


def test_embeddings_are_batch_invariant(embedder):
    texts = ["red circle", "what shape is shown in the image of a gray pentagon", "star", "a"]
    images = [random_image(s, size=(20 + 9 * s, 64)) for s in range(4)]
    small = embedder.batch_size
    try:
        embedder.batch_size = 4
        t_all, i_all = embedder.embed_texts(texts), embedder.embed_images(images)
        embedder.batch_size = 1
        t_one, i_one = embedder.embed_texts(texts), embedder.embed_images(images)
    finally:
        embedder.batch_size = small
    np.testing.assert_allclose(t_all, t_one, atol=1e-5)
    np.testing.assert_allclose(i_all, i_one, atol=1e-5)
    # different texts give different vectors (the pooled token is not padding)
    assert not np.allclose(t_all[0], t_all[2], atol=1e-3)


# ------------------------------------------------------------------ loading, errors


def test_loaders_cache_per_process_and_share_weights(fixture_paths):
    clear_cache()
    cfg = ModelConfig(model_id=f"fixtures/{STUDENT}", batch_size=3, max_new_tokens=5)
    a = load_student(cfg)
    b = load_student(cfg)
    t = load_teacher(cfg.model_copy(update={"batch_size": 7}), class_names=None)
    assert a.model is b.model is t.model
    assert isinstance(a, Student) and isinstance(t, Teacher)
    assert (a.batch_size, a.max_new_tokens, t.batch_size) == (3, 5, 7)
    e1 = load_embedder(ModelConfig(model_id=f"fixtures/{EMBEDDER}"))
    assert e1 is load_embedder(ModelConfig(model_id=f"fixtures/{EMBEDDER}"))
    assert isinstance(e1, HFEmbedder) and isinstance(e1, Embedder)
    assert isinstance(load_teacher(ModelConfig(model_id=f"fixtures/{TEACHER}")), HFVLM)


@pytest.mark.parametrize(
    "model_id", ["fixtures/no-such-model", "/nonexistent/model/folder", "no-such-org/no-such-vlm"]
)
def test_unknown_model_id_is_a_one_line_error(model_id, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    clear_cache()
    with pytest.raises(ModelLoadError) as e:
        load_student(ModelConfig(model_id=model_id))
    assert model_id in str(e.value) and "\n" not in str(e.value)


def test_a_folder_that_is_not_a_vlm_is_a_one_line_error(fixture_paths):
    with pytest.raises(ModelLoadError) as e:
        HFVLM(str(fixture_paths[EMBEDDER]))
    assert "\n" not in str(e.value)
    with pytest.raises(ModelLoadError):
        HFEmbedder(str(fixture_paths[STUDENT]))
