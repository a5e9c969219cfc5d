"""The mini-world: a short training schedule runs and learns; the shipped models meet
their targets on held-out images."""

from __future__ import annotations

import json

import pytest

from icd.miniworld.evaluate import TARGETS, evaluate
from icd.miniworld.train import Recipe, student_episode, train_all
from icd.models.fixtures import EMBEDDER, MARKER, NAMES, STUDENT, TEACHER


def test_a_short_schedule_trains_every_model_and_the_loss_falls(tmp_path):
    recipe = Recipe(
        per_class=4, embedder_steps=30, teacher_steps=30, student_steps=30, match_steps=10
    )
    report = train_all(tmp_path, recipe=recipe, log=lambda _: None)
    assert set(report) == set(NAMES)
    for name, info in report.items():
        curve = [loss for _, loss in info["loss_curve"]]
        assert len(curve) >= 3 and curve[-1] < curve[0], (name, curve)
        marker = json.loads((tmp_path / name / MARKER).read_text())
        assert marker["recipe"]["student_steps"] == 30 and marker["seconds"] > 0
    matching = report[STUDENT]["match_phase"]["loss_curve"]
    assert len(matching) >= 2 and all(loss > 0 for _, loss in matching)
    # What was written loads through the real backends.
    from icd.models.hf import HFVLM, HFEmbedder

    assert HFEmbedder(str(tmp_path / EMBEDDER)).dim == 64
    for name in (STUDENT, TEACHER):
        assert HFVLM(str(tmp_path / name), max_new_tokens=2).model.training is False
    assert not (tmp_path / ".untrained").exists()


def test_student_episodes_follow_the_recipe():
    import random

    from icd.data import shapes
    from icd.miniworld.train import render_bank

    bank = render_bank(3, 5000)
    rng = random.Random(0)
    eps = [student_episode(rng, bank, 4) for _ in range(400)]
    base = set(shapes.BASE_CLASSES)
    for ep in eps:
        truth = shapes.CLASS_NAMES[bank.labels[ep.query]]
        assert len(ep.demos) <= 4 and all(d != ep.query for d, _ in ep.demos)
        if ep.kind == "zs_base":
            assert not ep.demos and ep.target == truth
        elif ep.kind == "zs_novel":
            assert not ep.demos and ep.target in base and truth not in base
        elif ep.kind == "icl_novel":
            # exactly one demo of the query's class, and the target is its label
            same = [label for d, label in ep.demos if bank.labels[d] == bank.labels[ep.query]]
            assert len(same) == 1 and ep.target == same[0]
            assert ep.target.split()[0] == truth.split()[0]  # colour kept, shape renamed
        else:
            assert ep.target == truth and truth in base
    kinds = {ep.kind for ep in eps}
    assert kinds == {"zs_base", "zs_novel", "icl_novel", "icl_base"}


# In-context matching among several unrelated demos is the one target the shipped student
# misses (measured 0.59 at k=3 against 0.80; 0.99 with one demo): it copies the shape word
# most novel demos carry rather than matching images. Pinned at its level so it cannot
# regress, and listed here so that meeting it fails this test until the list is updated.
KNOWN_MISSES = {"student.icl_novel_k3_one_match": 0.5}


@pytest.mark.slow
def test_the_shipped_models_meet_their_targets():
    found = evaluate(per_class=8)
    assert set(found["targets"]) == set(TARGETS)
    missed = {k: c["value"] for k, c in found["targets"].items() if not c["met"]}
    assert set(missed) == set(KNOWN_MISSES), missed
    for key, floor in KNOWN_MISSES.items():
        assert missed[key] >= floor, (key, missed[key])
    assert found["student.icl_novel_k1_one_match"] >= 0.9


def test_the_token_contrast_loss_rewards_same_class_tokens_together():
    import torch

    from icd.miniworld.train import _supcon

    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    together = torch.eye(3)[labels] + 0.01 * torch.randn(6, 3)
    apart = torch.eye(6)  # every token its own direction
    assert _supcon(together, labels) < _supcon(apart, labels)
