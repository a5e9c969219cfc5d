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
        per_class=4,
        teacher_per_class=6,
        glyph_per_class=2,
        embedder_steps=30,
        teacher_steps=30,
        student_steps=30,
        student_cycle2_steps=10,
        checkpoint_every=10,
    )
    report = train_all(tmp_path, recipe=recipe, log=lambda _: None)
    assert set(report) == set(NAMES)
    for name, info in report.items():
        curve = [loss for _, loss in info["loss_curve"]]
        assert len(curve) >= 3 and curve[-1] < curve[0], (name, curve)
        marker = json.loads((tmp_path / name / MARKER).read_text())
        assert marker["recipe"]["student_steps"] == 30 and marker["seconds"] > 0
    cycle2 = report[STUDENT]["cycle2"]["loss_curve"]  # the warm restart ran and learns
    assert len(cycle2) >= 2 and all(loss > 0 for _, loss in cycle2)
    # What was written loads through the real backends.
    from icd.models.hf import HFVLM, HFEmbedder

    assert HFEmbedder(str(tmp_path / EMBEDDER)).dim == 64
    for name in (STUDENT, TEACHER):
        assert HFVLM(str(tmp_path / name), max_new_tokens=2).model.training is False
    assert not (tmp_path / ".untrained").exists()


def test_student_episodes_follow_the_recipe():
    import random

    from icd.data import shapes
    from icd.miniworld import world
    from icd.miniworld.train import N_SHAPES, render_bank, render_glyph_bank

    bank = render_glyph_bank(2, 5000, render_bank(3, 5000))
    pools = world.label_pool()
    names = {n.lower() for n in shapes.CLASS_NAMES}
    assert not names & set(pools[0] + pools[1]) and len(pools[0]) + len(pools[1]) > 1000
    rng = random.Random(0)
    eps = [student_episode(rng, bank, 5, labels=pools) for _ in range(600)]
    base = set(shapes.BASE_CLASSES)
    targets: dict[int, set[str]] = {}
    for ep in eps:
        q = bank.labels[ep.query]
        truth = shapes.CLASS_NAMES[q] if q < N_SHAPES else None
        assert len(ep.demos) <= 5 and all(d != ep.query for d, _ in ep.demos)
        labels = {}
        for d, label in ep.demos:  # one label per class within an episode
            assert labels.setdefault(bank.labels[d], label) == label
            # a base class shows under its name; a novel class's name is never a label
            c = bank.labels[d]
            real = c < N_SHAPES and label == shapes.CLASS_NAMES[c]
            assert real == (c < N_SHAPES and shapes.CLASS_NAMES[c] in base)
            assert label not in shapes.NOVEL_CLASSES
        if ep.kind == "zs_base":
            assert not ep.demos and ep.target == truth
        elif ep.kind == "zs_novel":
            assert not ep.demos and ep.target in base and truth not in base
        elif ep.kind in ("icl_glyph", "icl_shapes"):
            # the query's class is in the context under a random label, never a class name
            assert ep.target == labels[q] and ep.target.lower() not in names
            assert (q >= N_SHAPES) == (ep.kind == "icl_glyph")
            assert truth is None or truth not in base
            targets.setdefault(q, set()).add(ep.target)
        else:
            assert ep.target == truth and truth in base
    # labels are drawn per episode: a class that recurs gets different labels
    assert any(len(t) > 1 for t in targets.values())
    assert {ep.kind for ep in eps} == {"zs_base", "zs_novel", "icl_glyph", "icl_shapes", "icl_base"}


def test_copier_episodes_put_the_query_class_nearest_and_keep_base_names():
    """The copier's episodes: an unfamiliar query's class is always the last demo and its
    label the target; a base query keeps its own name; every label is whole words."""
    import random

    from icd.data import shapes
    from icd.miniworld.train import (
        N_SHAPES,
        copier_episode,
        render_bank,
        render_glyph_bank,
        whole_word_pool,
    )
    from icd.models.fixtures import resolve_model_path

    bank = render_glyph_bank(2, 5000, render_bank(3, 5000))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path(f"fixtures/{STUDENT}"))
    pools = whole_word_pool(tok)
    novel_names = set(shapes.NOVEL_CLASSES)
    assert novel_names <= set(pools[0])  # the evaluation's novel names are producible
    assert not set(shapes.BASE_CLASSES) & set(pools[0] + pools[1])
    assert all(len(tok(" " + n, add_special_tokens=False)["input_ids"]) == 2 for n in pools[1])
    rng = random.Random(0)
    eps = [copier_episode(rng, bank, 5, labels=pools) for _ in range(600)]
    base = set(shapes.BASE_CLASSES)
    base_last = base_absent = 0
    for ep in eps:
        q = bank.labels[ep.query]
        truth = shapes.CLASS_NAMES[q] if q < N_SHAPES else None
        classes = [bank.labels[d] for d, _ in ep.demos]
        assert len(classes) == len(set(classes)) <= 5 and all(d != ep.query for d, _ in ep.demos)
        if ep.kind == "zs_base":
            assert not ep.demos and ep.target == truth in base
        elif ep.kind == "zs_novel":
            assert not ep.demos and ep.target in base and truth not in base
        elif ep.kind in ("icl_glyph", "icl_shapes"):
            assert classes[-1] == q and ep.target == ep.demos[-1][1]
            assert truth not in base
        else:
            assert ep.target == truth in base
            base_last += classes[-1:] == [q]
            base_absent += q not in classes
    assert base_last and base_absent > base_last  # its class last sometimes, mostly absent
    assert {ep.kind for ep in eps} == {"zs_base", "zs_novel", "icl_glyph", "icl_shapes", "icl_base"}


def test_an_interrupted_student_run_resumes_from_its_checkpoint(tmp_path):
    """A run killed after a checkpoint continues from it and ends with the weights an
    uninterrupted run ends with."""
    import torch

    recipe = Recipe(
        per_class=3, glyph_per_class=2, student_steps=6, student_cycle2_steps=0, checkpoint_every=3
    )
    whole = train_all(tmp_path / "whole", recipe=recipe, names=[STUDENT], log=lambda _: None)

    class Killed(Exception):
        pass

    def kill_after_checkpoint(msg: str) -> None:
        if "step 4/" in msg:
            raise Killed

    # six steps log every step: the kill comes after the checkpoint of step 3
    with pytest.raises(Killed):
        train_all(tmp_path / "cut", recipe=recipe, names=[STUDENT], log=kill_after_checkpoint)
    assert (tmp_path / "cut" / f".{STUDENT}.ckpt.pt").exists()
    seen: list[str] = []
    resumed = train_all(tmp_path / "cut", recipe=recipe, names=[STUDENT], log=seen.append)
    assert any("resumed cycle 1 at step 3" in m for m in seen)
    assert not (tmp_path / "cut" / f".{STUDENT}.ckpt.pt").exists()
    from safetensors.torch import load_file

    a = load_file(tmp_path / "whole" / STUDENT / "model.safetensors")
    b = load_file(tmp_path / "cut" / STUDENT / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert whole[STUDENT]["recipe"] == resumed[STUDENT]["recipe"]


# The shipped student is the nearest-demo copier (docs/miniworld.md). It misses one target
# narrowly: with its class nearest, a novel query gets its label 0.944 (target 0.95; rings
# whose hole hides look like circles, so the student keeps its own name). Pinned at a floor
# below that so it cannot regress, and listed so that meeting it fails this test until the
# list is updated.
KNOWN_MISSES = {"student.icl_novel_k3_nearest": 0.9}


@pytest.mark.slow
def test_the_shipped_models_meet_their_targets():
    found = evaluate(per_class=20)  # as in the docs: smaller samples swing by 5 points
    assert found["student.design"] == "copier"
    assert set(found["targets"]) == set(TARGETS)
    missed = {k: c["value"] for k, c in found["targets"].items() if not c["met"]}
    assert set(missed) == set(KNOWN_MISSES), missed
    for key, floor in KNOWN_MISSES.items():
        assert missed[key] >= floor, (key, missed[key])
    # the copier reads the nearest demo, not the matching one: it is near chance there
    assert found["student.icl_novel_k3_one_match"] < 0.6


def test_the_token_contrast_loss_rewards_same_class_tokens_together():
    import torch

    from icd.miniworld.train import _supcon

    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    together = torch.eye(3)[labels] + 0.01 * torch.randn(6, 3)
    apart = torch.eye(6)  # every token its own direction
    assert _supcon(together, labels) < _supcon(apart, labels)
