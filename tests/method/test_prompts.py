"""Prompt building: interleaved demo turns, image order, task templates."""

from __future__ import annotations

import pytest
from PIL import Image

from icd.method.prompts import build_prompt, format_question


def img(color: str) -> Image.Image:
    return Image.new("RGB", (4, 4), color)


def texts(message) -> list[str]:
    return [c["text"] for c in message["content"] if c["type"] == "text"]


def test_interleaved_demos_then_query():
    demos = [(img("red"), "What shape?", "circle"), (img("blue"), "What shape?", "square")]
    query = img("green")
    p = build_prompt("What shape?", query, demos, task="classification")
    assert [m["role"] for m in p.messages] == ["user", "assistant", "user", "assistant", "user"]
    assert [im.getpixel((0, 0)) for im in p.images] == [(255, 0, 0), (0, 0, 255), (0, 128, 0)]
    n_image_slots = sum(c["type"] == "image" for m in p.messages for c in m["content"])
    assert n_image_slots == len(p.images) == 3
    for m in p.messages[::2]:
        assert m["content"][0] == {"type": "image"}  # image before its question
    assert texts(p.messages[1]) == ["circle"] and texts(p.messages[3]) == ["square"]
    # Every user turn uses the same template, so demos show the answer format.
    assert texts(p.messages[0]) == texts(p.messages[2]) == texts(p.messages[4])
    assert "class name only" in texts(p.messages[4])[0]


def test_zero_demos_is_a_single_user_turn():
    p = build_prompt("What is it?", img("red"), [], task="vqa")
    assert len(p.messages) == 1 and len(p.images) == 1
    assert texts(p.messages[0]) == ["What is it? Answer with a single word or phrase."]


def test_class_names_listed_in_the_query_turn_only():
    demos = [(img("red"), "What shape?", "circle")]
    p = build_prompt("What shape?", img("blue"), demos, "classification", ["circle", "square"])
    assert "Options: circle, square." in texts(p.messages[-1])[0]
    assert "Options" not in texts(p.messages[0])[0]
    assert "Options" not in format_question("q", "vqa", ["circle"])


def test_empty_question_and_unknown_task():
    assert format_question("  ", "classification").startswith("What is shown in the image?")
    with pytest.raises(ValueError, match="unknown task"):
        build_prompt("q", img("red"), [], task="retrieval")
