"""Golden tests: the prompts ``build_prompt`` makes, rendered by the real chat templates of
the preset models (vendored in ``tests/data/templates``, each with its source).

Rendering uses transformers' own ``render_jinja_template`` (what ``apply_chat_template``
calls), with the checkpoint's special tokens. Where a processor can be built offline
(Idefics3; LLaVA's processor with the LLaVA-OneVision template), a tiny model runs through
the real template.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers.utils.chat_template_utils import render_jinja_template

from icd.method.prompts import build_prompt, format_question
from icd.models.fixtures import STUDENT, TEACHER

TEMPLATES = Path(__file__).resolve().parents[1] / "data" / "templates"
QUESTION = "What bird is this?"
Q = format_question(QUESTION, "classification")  # the text of every user turn
DEMOS = ("cardinal", "blue jay", "robin")


def template(name: str) -> dict:
    return json.loads((TEMPLATES / f"{name}.json").read_text())


def _img(i: int) -> Image.Image:
    return Image.new("RGB", (40 + 4 * i, 36), (30 * i, 90, 200))


def icl_prompt(k: int = 3):
    demos = [(_img(i), QUESTION, DEMOS[i]) for i in range(k)]
    return build_prompt(QUESTION, _img(9), demos, "classification")


def render(name: str, k: int) -> str:
    t = template(name)
    rendered, _ = render_jinja_template(
        conversations=[icl_prompt(k).messages],
        chat_template=t["chat_template"],
        add_generation_prompt=True,
        **{f"{k}_token": v for k, v in t["tokens"].items()},
    )
    return rendered[0]


SMOL_USER = f"User:<image>{Q}<end_of_utterance>\n"
QWEN_USER = f"<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{Q}<|im_end|>\n"
LLAVA_USER = f"<|im_start|>user <image>\n{Q}<|im_end|>"

GOLDEN = {
    # Roles capitalised, ":" glued to an image-first turn, ": " before a text-only (assistant)
    # turn; the generation prompt is "Assistant:" with no space, so the model writes " robin".
    "smolvlm-256m-instruct": (
        "<|im_start|>" + "".join(SMOL_USER + f"Assistant: {a}<end_of_utterance>\n" for a in DEMOS)
    )
    + SMOL_USER
    + "Assistant:",
    # A default system turn is added; each image is a vision block before its text.
    "qwen2.5-vl-7b-instruct": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        + "".join(QWEN_USER + f"<|im_start|>assistant\n{a}<|im_end|>\n" for a in DEMOS)
        + QWEN_USER
        + "<|im_start|>assistant\n"
    ),
    # No newline between turns; images first in a turn, then "\n" + text. A demo's assistant
    # turn opens "assistant \n" (role + space, then "\n" + text) while the generation prompt
    # is "assistant\n": the checkpoint's own asymmetry, kept as is.
    "llava-onevision-qwen2-7b-ov-hf": (
        "".join(LLAVA_USER + f"<|im_start|>assistant \n{a}<|im_end|>" for a in DEMOS)
        + LLAVA_USER
        + "<|im_start|>assistant\n"
    ),
}
ZERO_SHOT = {
    "smolvlm-256m-instruct": "<|im_start|>" + SMOL_USER + "Assistant:",
    "qwen2.5-vl-7b-instruct": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        + QWEN_USER
        + "<|im_start|>assistant\n"
    ),
    "llava-onevision-qwen2-7b-ov-hf": LLAVA_USER + "<|im_start|>assistant\n",
}
IMAGE_MARK = {
    "smolvlm-256m-instruct": "<image>",
    "qwen2.5-vl-7b-instruct": "<|vision_start|><|image_pad|><|vision_end|>",
    "llava-onevision-qwen2-7b-ov-hf": "<image>",
}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_three_demo_icl_prompt_renders_as_the_golden_text(name):
    text = render(name, 3)
    assert text == GOLDEN[name]
    # one image placeholder per demo and one for the query, each before its question
    assert text.count(IMAGE_MARK[name]) == 4
    parts = text.split(IMAGE_MARK[name])
    assert all(p.lstrip("\n").startswith(Q) for p in parts[1:])
    # demos in order, the query's turn last and open
    assert [text.index(a) for a in DEMOS] == sorted(text.index(a) for a in DEMOS)
    assert text.rindex(Q) > text.rindex(DEMOS[-1])


@pytest.mark.parametrize("name", sorted(ZERO_SHOT))
def test_zero_shot_prompt_renders_as_the_golden_text(name):
    assert render(name, 0) == ZERO_SHOT[name]


def test_vendored_templates_name_their_sources():
    for path in TEMPLATES.glob("*.json"):
        t = json.loads(path.read_text())
        assert t["model"] and t["source"] and t["chat_template"], path.name


def test_llava_onevision_reference_render_matches():
    # transformers' own test renders this for llava-hf/llava-onevision-qwen2-7b-ov-hf
    t = template("llava-onevision-qwen2-7b-ov-hf")
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": "What is shown in this image?"},
            ],
        }
    ]
    rendered, _ = render_jinja_template(
        conversations=[messages], chat_template=t["chat_template"], add_generation_prompt=True
    )
    assert rendered[0] == t["reference_render"]


def _with_template(src: Path, dst: Path, chat_template: str) -> Path:
    shutil.copytree(src, dst)
    (dst / "chat_template.jinja").write_text(chat_template)
    return dst


@pytest.mark.parametrize(
    ("fixture", "name"),
    [(STUDENT, "smolvlm-256m-instruct"), (TEACHER, "llava-onevision-qwen2-7b-ov-hf")],
)
def test_tiny_model_runs_through_the_real_template(fixture_paths, tmp_path, fixture, name):
    """Idefics3 (SmolVLM's processor class) and LLaVA's processor with the real templates:
    image tokens where the placeholders are, left padding, batched = one by one."""
    from icd.models.hf import HFVLM

    t = template(name)
    folder = _with_template(fixture_paths[fixture], tmp_path / fixture, t["chat_template"])
    vlm = HFVLM(str(folder), batch_size=2, max_new_tokens=4)
    assert vlm.processor.chat_template == t["chat_template"]
    prompts = [icl_prompt(3), icl_prompt(0)]
    text = vlm.processor.apply_chat_template(prompts[0].messages, add_generation_prompt=True)
    assert text == GOLDEN[name]
    enc = vlm._encode(prompts)
    image_id = vlm.tokenizer.convert_tokens_to_ids(t["processor"]["image_token"])
    per_prompt = (enc["input_ids"] == image_id).sum(dim=1).tolist()
    assert per_prompt[0] == 4 * per_prompt[1] > 0  # 3 demos + query vs the query alone
    assert torch.all(enc["attention_mask"][:, -1] == 1)  # left padded: prompts end together
    batched = [g.text for g in vlm.generate(prompts)]
    single = [vlm.generate([p])[0].text for p in prompts]
    assert batched == single
