"""Chat prompts for the student and the teacher (docs/design.md §2.7).

A prompt is a Hugging Face chat: each demonstration is a user turn (its image, then the
templated question) followed by an assistant turn holding its answer; the query is the final
user turn. The processor's chat template turns it into the model's own format. Every turn
uses the same task template, so the demonstrations show the answer format the query wants.

Task templates (short, so tiny models and long demo lists stay cheap):

- ``classification``: the question, then "Answer with the class name only." With
  ``class_names`` the query turn (only) also lists the options.
- ``vqa``: the question, then "Answer with a single word or phrase."
- ``captioning``: the question (the dataset's, e.g. "What is shown in the image?"), then
  "Describe the image in one short sentence." A demonstration's answer is a caption (the
  teacher's consensus caption, :func:`icd.method.voting.aggregate_captions`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PIL import Image

from icd.method.types import Prompt

TASKS = ("classification", "vqa", "captioning")
_INSTRUCTION = {
    "classification": "Answer with the class name only.",
    "vqa": "Answer with a single word or phrase.",
    "captioning": "Describe the image in one short sentence.",
}
_DEFAULT_QUESTION = {
    "classification": "What is shown in the image?",
    "vqa": "What is shown in the image?",
    "captioning": "What is shown in the image?",
}


def format_question(question: str, task: str, class_names: Sequence[str] | None = None) -> str:
    """The text of one user turn: question (a default if empty), options, instruction."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    parts = [question.strip() or _DEFAULT_QUESTION[task]]
    if class_names and task == "classification":
        parts.append("Options: " + ", ".join(class_names) + ".")
    parts.append(_INSTRUCTION[task])
    return " ".join(parts)


def _user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}


def build_prompt(
    question: str,
    image: Image.Image,
    demos: Sequence[tuple[Image.Image, str, str]] = (),
    task: str = "classification",
    class_names: Sequence[str] | None = None,
    image_ids: Sequence[str | None] = (),
) -> Prompt:
    """The interleaved prompt: ``demos`` as (image, question, answer) turns, then the query.

    ``Prompt.images`` holds the demo images in order, then the query image; the i-th
    ``{"type": "image"}`` entry of the messages refers to ``images[i]``. ``image_ids``, when
    given, names those images in the same order (see :class:`Prompt`).
    """
    if image_ids and len(image_ids) != len(demos) + 1:
        raise ValueError(f"{len(image_ids)} image ids for {len(demos) + 1} images")
    messages: list[dict[str, Any]] = []
    images: list[Image.Image] = []
    for demo_image, demo_question, answer in demos:
        messages.append(_user(format_question(demo_question, task)))
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        images.append(demo_image)
    messages.append(_user(format_question(question, task, class_names)))
    images.append(image)
    return Prompt(messages=messages, images=images, image_ids=list(image_ids))
