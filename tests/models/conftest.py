"""Shared fixtures for the model backend tests: the tiny models, loaded once per session."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from icd.method.types import Prompt
from icd.models.fixtures import (
    EMBEDDER,
    NAMES,
    STUDENT,
    TEACHER,
    build_model_fixtures,
    fixtures_dir,
)

QUESTION = "What shape is shown in the image? Answer with a short phrase."


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine
    thread contention makes them several times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def fixture_paths():
    """name -> folder of the shipped, trained mini-world models."""
    from icd.models.fixtures import resolve_model_path

    return {name: resolve_model_path(f"fixtures/{name}") for name in NAMES}


@pytest.fixture(scope="session")
def untrained_paths():
    """name -> folder of the untrained architectures (training's starting point), built
    once into the session's fixture cache."""
    return build_model_fixtures(fixtures_dir() / "untrained")


@pytest.fixture(scope="session")
def student(fixture_paths):
    from icd.models.hf import HFVLM

    return HFVLM(f"fixtures/{STUDENT}", batch_size=4, max_new_tokens=8)


@pytest.fixture(scope="session")
def teacher(fixture_paths):
    from icd.models.hf import HFVLM

    return HFVLM(f"fixtures/{TEACHER}", batch_size=4, max_new_tokens=8)


@pytest.fixture(scope="session")
def embedder(fixture_paths):
    from icd.models.hf import HFEmbedder

    return HFEmbedder(f"fixtures/{EMBEDDER}", batch_size=4)


@pytest.fixture(params=["student", "teacher"])
def vlm(request):
    """Each VLM architecture in turn (Idefics3 student, LLaVA teacher)."""
    return request.getfixturevalue(request.param)


def random_image(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def icl_prompt(
    seed: int, k: int = 2, labels: tuple[str, ...] = ("red circle", "blue star")
) -> Prompt:
    """k demonstrations (image, question, answer) as earlier turns, then the query."""
    messages, images = [], []
    for j in range(k):
        messages += [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
            {"role": "assistant", "content": [{"type": "text", "text": labels[j % len(labels)]}]},
        ]
        images.append(random_image(seed * 10 + j, size=(40 + 8 * j, 48)))
    messages.append(
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}
    )
    images.append(random_image(seed * 10 + 9))
    return Prompt(messages=messages, images=images)
