"""LoRA adaptation of the student (the fine-tuning baselines): it learns what it is trained
on, deterministically, and reports its cost."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from icd.config import FinetuneConfig
from icd.data import shapes
from icd.method.prompts import build_prompt
from icd.models.finetune import encode_answers, parameter_count, train_adapter, with_adapter
from icd.models.hf import HFVLM

NOVEL = "red star"


@pytest.fixture(scope="module")
def student(fixture_paths) -> HFVLM:
    return HFVLM(str(fixture_paths["tiny-idefics3"]), batch_size=16, max_new_tokens=6)


def _examples(n: int = 8) -> list[tuple]:
    """``n`` held-out images of one novel class (the student has never named it)."""
    out = []
    i = 0
    while len(out) < n:
        if shapes.CLASS_NAMES[shapes.label_of(i, 7)] == NOVEL:
            image = Image.open(io.BytesIO(shapes.render_shape(i, 7))).convert("RGB")
            out.append((build_prompt(shapes.QUESTION, image), NOVEL))
        i += 1
    return out


def test_labels_cover_only_the_answer(student) -> None:
    prompt, answer = _examples(1)[0]
    enc = encode_answers(student.processor, [prompt], [answer])
    answer_ids = enc["labels"][enc["labels"] != -100].tolist()
    text = student.tokenizer.decode(answer_ids, skip_special_tokens=True)
    assert text.strip() == answer


def test_the_adapter_teaches_the_student_its_training_labels(student, tmp_path) -> None:
    examples = _examples()
    prompts = [p for p, _ in examples]
    before = [g.text for g in student.generate(prompts)]
    assert sum(a == NOVEL for a in before) == 0  # a novel class: the student never says it
    cfg = FinetuneConfig(steps_per_chunk=30, lr=1e-2, batch_size=4)
    cost = train_adapter(
        vlm=student, examples=examples, start=None, out=tmp_path / "a", cfg=cfg, seed=1
    )
    after = [g.text for g in with_adapter(student, tmp_path / "a").generate(prompts)]
    assert sum(a == NOVEL for a in after) >= 6
    assert [g.text for g in student.generate(prompts)] == before  # the base is untouched
    assert cost.steps == 30 and cost.tokens > 0 and cost.examples == 8
    # ≈ 6 FLOPs per parameter (the student's and the adapter's) per token trained on
    per_token = cost.flops / (6 * cost.tokens)
    assert parameter_count(student) <= per_token <= 1.05 * parameter_count(student)


def _snapshot(vlm: HFVLM) -> tuple:
    """The model's weights, module classes and trainable flags."""
    return (
        {k: v.clone() for k, v in vlm.model.state_dict().items()},
        [(n, type(m).__name__) for n, m in vlm.model.named_modules()],
        {n: p.requires_grad for n, p in vlm.model.named_parameters()},
    )


def _same(a: tuple, b: tuple) -> bool:
    return (
        a[0].keys() == b[0].keys()
        and all(torch.equal(a[0][k], b[0][k]) for k in a[0])
        and a[1:] == b[1:]
    )


def test_training_borrows_the_weights_and_gives_them_back_even_on_failure(
    student, tmp_path, monkeypatch
) -> None:
    """The LoRA layers go into the student's own weights for a round (no copy of the model)
    and come out again: bit for bit the same weights, modules and flags, also when the
    round fails half-way."""
    import icd.models.finetune as finetune

    examples = _examples(4)
    cfg = FinetuneConfig(steps_per_chunk=3, lr=1e-2, batch_size=2)
    before = _snapshot(student)
    seen = []

    def spy(model, batch):
        if model.get_base_model() is student.model:  # the student's own weights, no copy
            seen.append(sum(1 for n, _ in model.named_modules() if "lora_A" in n))
        return real(model, batch)

    real = finetune.answer_loss
    monkeypatch.setattr(finetune, "answer_loss", spy)
    train_adapter(vlm=student, examples=examples, start=None, out=tmp_path / "a", cfg=cfg, seed=1)
    train_adapter(
        vlm=student, examples=examples, start=tmp_path / "a", out=tmp_path / "b", cfg=cfg, seed=2
    )
    assert len(seen) == 6 and min(seen) > 0  # trained with LoRA layers in place
    assert _same(_snapshot(student), before) and not student.model.training

    def fail(model, batch):
        raise RuntimeError("out of patience")

    monkeypatch.setattr(finetune, "answer_loss", fail)
    with pytest.raises(RuntimeError, match="out of patience"):
        train_adapter(
            vlm=student, examples=examples, start=None, out=tmp_path / "c", cfg=cfg, seed=1
        )
    assert _same(_snapshot(student), before) and not (tmp_path / "c").exists()


def test_training_is_deterministic_resumable_and_costs_grow_with_steps(student, tmp_path) -> None:
    examples = _examples(4)
    short = FinetuneConfig(steps_per_chunk=2, batch_size=2)
    long = FinetuneConfig(steps_per_chunk=8, batch_size=2)

    def weights(path):
        from safetensors.torch import load_file

        return load_file(str(path / "adapter_model.safetensors"))

    a = train_adapter(
        vlm=student, examples=examples, start=None, out=tmp_path / "a", cfg=short, seed=3
    )
    train_adapter(vlm=student, examples=examples, start=None, out=tmp_path / "b", cfg=short, seed=3)
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # A round that starts from a saved adapter continues from it.
    train_adapter(
        vlm=student, examples=examples, start=tmp_path / "a", out=tmp_path / "c", cfg=short, seed=4
    )
    fresh = weights(tmp_path / "c")
    assert any(not torch.equal(wa[k], fresh[k]) for k in wa)
    b = train_adapter(
        vlm=student, examples=examples, start=None, out=tmp_path / "d", cfg=long, seed=3
    )
    assert b.steps == 4 * a.steps and b.tokens > a.tokens
    assert b.seconds > a.seconds and b.flops > a.flops
