"""What a real GPU run needs from the HF backend, exercised on the tiny fixture models: load
options, devices, out-of-memory backoff, the seeded sampler, one-line dependency errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from icd.config import ModelConfig
from icd.data.types import Sample
from icd.models import ModelLoadError, ModelOOMError, clear_cache, load_student, pick_device
from icd.models import hf as hf_mod
from icd.models.base import Sampling
from icd.models.fixtures import EMBEDDER, STUDENT, TEACHER
from icd.models.hf import HFVLM, HFEmbedder, HFLoad, _RowSampler

from .conftest import icl_prompt, random_image


@pytest.fixture(scope="module")
def paths():
    from icd.models.fixtures import build_model_fixtures, fixtures_dir

    return build_model_fixtures(fixtures_dir())


@pytest.fixture(scope="module")
def tiny(paths):
    return {TEACHER: HFVLM(str(paths[TEACHER]), batch_size=4, max_new_tokens=6)}


def _samples(n: int) -> list[Sample]:
    return [Sample(sample_id=f"s{i}", stream_pos=i, question="q", answers=["x"]) for i in range(n)]


# -- the seeded sampler -------------------------------------------------------------------


def _reference_draws(probs_steps, seeds):
    """The sampler's contract on CPU: what one generator per row and
    ``torch.multinomial(probs[i], 1)`` per row give, step after step."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return [
        torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, gens, strict=True)])
        for probs in probs_steps
    ]


def test_sampler_draws_equal_row_by_row_multinomial_on_cpu():
    torch.manual_seed(0)
    seeds = [hf_mod._draw_seed(3, f"s{i}", k) for i in range(4) for k in range(3)]
    steps = [torch.randn(len(seeds), 120_000) * 4 for _ in range(3)]
    sampler = _RowSampler(0.7, seeds)
    picks = []
    for scores in steps:
        out = sampler(None, scores)
        assert torch.isneginf(out).sum(dim=1).tolist() == [scores.shape[1] - 1] * len(seeds)
        picks.append(out.argmax(dim=1))
    want = _reference_draws([torch.softmax(s / 0.7, dim=-1) for s in steps], seeds)
    for got, ref in zip(picks, want, strict=True):
        assert torch.equal(got, ref)


def test_sampler_never_copies_the_vocabulary_to_the_host(monkeypatch):
    sampler = _RowSampler(1.0, [1, 2])
    scores = torch.randn(2, 50_000)

    def no_host_copy(self, *a, **k):
        raise AssertionError("a full-vocabulary tensor went to the host")

    monkeypatch.setattr(torch.Tensor, "cpu", no_host_copy)
    out = sampler(None, scores)
    assert out.device == scores.device
    assert all(g.device == scores.device for g in sampler.generators)


def test_sampled_answers_match_the_host_sampler_end_to_end(tiny, monkeypatch):
    from icd.bench.sampler import HostRowSampler

    vlm = tiny[TEACHER]
    samples, prompts = _samples(3), [icl_prompt(50 + s, k=1) for s in range(3)]
    sampling = Sampling(4, 1.0, True, 5)
    now = [[g.text for g in a.generations] for a in vlm.annotate(samples, prompts, sampling)]
    monkeypatch.setattr(hf_mod, "_RowSampler", HostRowSampler)
    before = [[g.text for g in a.generations] for a in vlm.annotate(samples, prompts, sampling)]
    assert now == before


# -- out of memory ------------------------------------------------------------------------


class _OOMAbove:
    """Wraps a callable taking a batch first: raises CUDA OOM when the batch is too big."""

    def __init__(self, fn, limit: int, rows) -> None:
        self.fn, self.limit, self.rows, self.sizes = fn, limit, rows, []

    def __call__(self, *args, **kwargs):
        n = self.rows(*args, **kwargs)
        self.sizes.append(n)
        if n > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.fn(*args, **kwargs)


def _gen_rows(**kw) -> int:
    return kw["input_ids"].shape[0]


def test_oom_halves_the_batch_and_gives_the_same_answers(paths):
    vlm = HFVLM(str(paths[STUDENT]), batch_size=8, max_new_tokens=6)
    prompts = [icl_prompt(90 + s, k=s % 2) for s in range(7)]
    expected = [g.text for g in vlm.with_settings(1, 6).generate(prompts)]
    fake = _OOMAbove(vlm.model.generate, 2, _gen_rows)
    vlm.model.generate = fake
    got = [g.text for g in vlm.generate(prompts)]
    assert got == expected
    assert fake.sizes[:3] == [7, 4, 2]  # 7 -> halved to 4 -> 2, which fits
    assert max(fake.sizes[3:]) <= 2  # later batches start at the size that fitted
    assert vlm._cap.value == 2
    # the teacher's annotate backs off the same way (rows = prompts x sampled copies)
    anns = vlm.annotate(_samples(3), prompts[:3], Sampling(3, 1.0, False, 1))
    assert all(a.error is None and len(a.generations) == 3 for a in anns)


def test_oom_at_batch_size_one_is_a_one_line_error(paths):
    vlm = HFVLM(str(paths[STUDENT]), batch_size=4, max_new_tokens=4)
    vlm.model.generate = _OOMAbove(vlm.model.generate, 0, _gen_rows)
    with pytest.raises(ModelOOMError, match="batch size 1") as e:
        vlm.generate([icl_prompt(1, k=1), icl_prompt(2, k=0)])
    assert "\n" not in str(e.value) and STUDENT in str(e.value)
    with pytest.raises(ModelOOMError):  # not recorded as per-sample teacher errors
        vlm.annotate(_samples(1), [icl_prompt(3)], Sampling(2, 1.0, True, 0))


def test_embedder_oom_halves_the_batch(paths):
    emb = HFEmbedder(str(paths[EMBEDDER]), batch_size=8)
    images = [random_image(i) for i in range(5)]
    expected = emb.embed_images(images)
    emb.model.get_image_features = _OOMAbove(
        emb.model.get_image_features, 2, lambda **kw: kw["pixel_values"].shape[0]
    )
    np.testing.assert_allclose(emb.embed_images(images), expected, atol=1e-6)
    assert emb._cap.value == 2


# -- load options and devices -------------------------------------------------------------


def test_processor_kwargs_apply_at_load_and_call(paths):
    # SmolVLM's processor splits big images into tiles; the preset switches it off. Here the
    # tiny Idefics3 processor is told to split (64 px into 32 px tiles: 4 tiles + global).
    plain = HFVLM(str(paths[STUDENT]), max_new_tokens=4)
    split = HFVLM(
        str(paths[STUDENT]),
        max_new_tokens=4,
        processor_kwargs={"do_image_splitting": True, "size": {"longest_edge": 64}},
    )
    assert split.processor.image_processor.do_image_splitting is True
    prompt = icl_prompt(4, k=1)
    image_id = plain.tokenizer.convert_tokens_to_ids("<image>")
    n_plain = int((plain._encode([prompt])["input_ids"] == image_id).sum())
    n_split = int((split._encode([prompt])["input_ids"] == image_id).sum())
    assert n_split == 5 * n_plain
    assert split.generate([prompt])[0].text is not None


def test_device_map_and_attention_implementation_load(paths, tiny):
    prompts = [icl_prompt(7 + s, k=s) for s in range(3)]
    mapped = HFVLM(
        str(paths[TEACHER]),
        load=HFLoad(device_map="cpu", attn_implementation="eager"),
        max_new_tokens=6,
    )
    assert mapped.device == torch.device("cpu")
    assert mapped.model.config._attn_implementation == "eager"
    assert [g.text for g in mapped.generate(prompts)] == [
        g.text for g in tiny[TEACHER].generate(prompts)
    ]


def test_load_options_are_part_of_the_model_identity(paths):
    clear_cache()
    base = ModelConfig(model_id=str(paths[STUDENT]), max_new_tokens=4)
    a = load_student(base)
    b = load_student(base.model_copy(update={"processor_kwargs": {"do_image_splitting": True}}))
    assert a.processor_kwargs == {} and b.processor_kwargs == {"do_image_splitting": True}
    assert a.model is not b.model
    clear_cache()


def test_cuda_without_cuda_is_a_one_line_error(paths, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelLoadError, match="CUDA is not available") as e:
        HFVLM(str(paths[STUDENT]), load=HFLoad(device="cuda"))
    assert "\n" not in str(e.value)


def test_dask_workers_get_distinct_gpus():
    assert [pick_device("cuda", 4, w) for w in (0, 1, 2, 3, 4)] == [
        "cuda:0",
        "cuda:1",
        "cuda:2",
        "cuda:3",
        "cuda:0",
    ]
    assert pick_device("cuda", 4, None) == "cuda"  # not in a worker: torch's current device
    assert pick_device("cuda:1", 4, 3) == "cuda:1"  # an explicit index is kept
    assert pick_device("cuda", 1, 3) == "cuda"
    named = {pick_device("cuda", 8, f"tcp://10.0.0.{i}:4000") for i in range(16)}
    assert len(named) > 1 and all(d.startswith("cuda:") for d in named)


# -- missing optional packages ------------------------------------------------------------


def test_qwen25vl_processor_without_torchvision_is_one_line_with_the_install(paths, tmp_path):
    """A local folder with the real Qwen2.5-VL processor configuration (the fixture's Qwen2
    tokenizer): transformers cannot build it without torchvision."""
    if hf_mod.has_module("torchvision"):
        pytest.skip("torchvision is installed here")
    folder = tmp_path / "qwen2.5-vl"
    folder.mkdir()
    for f in paths[TEACHER].glob("tokenizer*"):
        shutil.copy(f, folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    (folder / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "Qwen2VLImageProcessor",
                "processor_class": "Qwen2_5_VLProcessor",
                "min_pixels": 3136,
                "max_pixels": 12845056,
                "patch_size": 14,
                "merge_size": 2,
                "temporal_patch_size": 2,
            }
        )
    )
    with pytest.raises(ModelLoadError) as e:
        HFVLM(str(folder))
    msg = str(e.value)
    assert "\n" not in msg and str(folder) in msg
    assert "needs torchvision" in msg and "pip install 'icd[gpu]'" in msg


def test_missing_accelerate_or_flash_attn_fail_before_loading(paths, monkeypatch):
    monkeypatch.setattr(hf_mod, "has_module", lambda name: False)
    with pytest.raises(ModelLoadError, match=r"needs accelerate.*icd\[gpu\]"):
        HFVLM(str(paths[TEACHER]), load=HFLoad(device_map="auto"))
    with pytest.raises(ModelLoadError, match=r"needs flash_attn.*attn_implementation: sdpa"):
        HFVLM(str(paths[TEACHER]), load=HFLoad(attn_implementation="flash_attention_2"))


def test_dependency_messages_are_recognised():
    assert hf_mod.missing_dependency("LlamaTokenizer requires the SentencePiece library") == (
        "sentencepiece"
    )
    assert hf_mod.missing_dependency("No module named 'torchvision'") == "torchvision"
    assert hf_mod.missing_dependency("Unrecognized image processor in /x") is None


def test_siglip_embedder_with_a_sentencepiece_tokenizer_loads(tmp_path):
    """Every real preset's embedder is SigLIP, whose tokenizer is SentencePiece: a tiny
    SigLIP (SentencePiece model trained here) loads and embeds through HFEmbedder."""
    import sentencepiece as spm
    from transformers import (
        SiglipConfig,
        SiglipImageProcessor,
        SiglipModel,
        SiglipProcessor,
        SiglipTokenizer,
    )

    words = [
        "red",
        "green",
        "blue",
        "circle",
        "square",
        "star",
        "triangle",
        "a",
        "photo",
        "of",
        "the",
        "shape",
        "is",
    ]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "\n".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(6)) for i in range(300))
    )
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(tmp_path / "sp"),
        vocab_size=30,
        hard_vocab_limit=False,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        minloglevel=2,
    )
    tok = SiglipTokenizer(vocab_file=str(tmp_path / "sp.model"), model_max_length=16)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    text.update(num_attention_heads=2, max_position_embeddings=16, pad_token_id=0, eos_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    vision.update(image_size=32, patch_size=8)
    torch.manual_seed(0)
    folder = tmp_path / "tiny-siglip"
    SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).save_pretrained(folder)
    image_processor = SiglipImageProcessor(size={"height": 32, "width": 32})
    SiglipProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(folder)

    emb = HFEmbedder(str(folder), batch_size=2)
    assert type(emb.tokenizer).__name__ == "SiglipTokenizer"
    texts = emb.embed_texts(["a red circle", "blue star", "a red circle"])
    assert texts.shape == (3, emb.dim) and np.allclose(texts[0], texts[2], atol=1e-6)
    assert np.allclose(np.linalg.norm(emb.embed_images([random_image(1)]), axis=1), 1.0)
