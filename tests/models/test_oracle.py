"""The oracle teacher: truth plus seeded noise, independent of call order."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from icd.config import ModelConfig
from icd.data.types import Sample
from icd.models import ModelLoadError, load_teacher
from icd.models.base import Sampling, Teacher
from icd.models.oracle import OracleTeacher

CLASSES = [f"class {i}" for i in range(20)]


def _samples(n: int, offset: int = 0) -> list[Sample]:
    return [
        Sample(sample_id=f"id-{i}", stream_pos=i, question="q", answers=[CLASSES[i % len(CLASSES)]])
        for i in range(offset, offset + n)
    ]


def _votes(teacher: OracleTeacher, samples: list[Sample], n: int) -> dict[str, list[str]]:
    anns = teacher.annotate(samples, [None] * len(samples), Sampling(n, 0.7, True, 0))  # fmt: skip
    return {
        s.sample_id: [g.text for g in a.generations] for s, a in zip(samples, anns, strict=True)
    }


def test_noise_free_oracle_returns_the_truth_and_counts_calls():
    oracle = OracleTeacher(CLASSES)
    assert isinstance(oracle, Teacher)
    samples = _samples(30)
    anns = oracle.annotate(samples, [None] * 30, Sampling(3, 0.7, True, 0))
    assert all(a.error is None for a in anns)
    assert [[g.text for g in a.generations] for a in anns] == [[s.answers[0]] * 3 for s in samples]
    g = anns[0].generations[0]
    assert np.all(g.token_logprobs == 0) and np.all(g.token_entropy == 0) and g.seq_logprob == 0
    assert oracle.calls == 30
    oracle.annotate(samples[:5], [None] * 5, Sampling(1, 0.0, True, 0))
    assert oracle.calls == 35


def test_noise_rate_matches_and_wrong_votes_are_other_classes():
    oracle = OracleTeacher(CLASSES, noise=0.3, seed=3)
    samples = _samples(2000)
    votes = _votes(oracle, samples, n=5)
    truth = {s.sample_id: s.answers[0] for s in samples}
    wrong = [v for sid, vs in votes.items() for v in vs if v != truth[sid]]
    rate = len(wrong) / (5 * len(samples))
    assert abs(rate - 0.3) < 0.02  # 4+ standard deviations for 10k votes
    assert set(wrong) <= set(CLASSES)
    # uniform over the other classes: every class is drawn, none dominates
    counts = Counter(wrong)
    assert len(counts) == len(CLASSES) and max(counts.values()) < 2 * len(wrong) / len(CLASSES)


@settings(max_examples=25, deadline=None)
@given(st.permutations(list(range(40))), st.integers(1, 40))
def test_votes_do_not_depend_on_order_or_batching(order, batch):
    samples = _samples(40)
    reference = _votes(OracleTeacher(CLASSES, noise=0.5, seed=1), samples, n=4)
    oracle = OracleTeacher(CLASSES, noise=0.5, seed=1)
    shuffled = [samples[i] for i in order]
    got: dict[str, list[str]] = {}
    for start in range(0, len(shuffled), batch):
        got.update(_votes(oracle, shuffled[start : start + batch], n=4))
    assert got == reference


def test_seed_changes_the_noise():
    samples = _samples(200)
    a = _votes(OracleTeacher(CLASSES, noise=0.5, seed=1), samples, n=3)
    b = _votes(OracleTeacher(CLASSES, noise=0.5, seed=2), samples, n=3)
    assert a != b


def test_vqa_truth_is_the_most_common_answer():
    sample = Sample("v", 0, "q", answers=["two", "2", "two", "three", "2", "two"])
    [ann] = OracleTeacher(None).annotate([sample], [None], Sampling(2, 0.7, False, 0))  # fmt: skip
    assert [g.text for g in ann.generations] == ["two", "two"]


def test_noisy_oracle_needs_class_names():
    with pytest.raises(ValueError, match="class names"):
        OracleTeacher(None, noise=0.1)
    with pytest.raises(ModelLoadError) as e:
        load_teacher(ModelConfig(backend="oracle", model_id="oracle", noise=0.2), class_names=None)
    assert "\n" not in str(e.value)


def test_load_teacher_builds_a_seeded_oracle():
    cfg = ModelConfig(backend="oracle", model_id="oracle", noise=0.4)
    a = load_teacher(cfg, CLASSES)
    assert isinstance(a, OracleTeacher) and a.noise == 0.4 and a.model_id == "oracle"
    assert load_teacher(cfg, CLASSES) is a
    other = load_teacher(cfg.model_copy(update={"model_id": "oracle-2"}), CLASSES)
    samples = _samples(100)
    assert _votes(a, samples, 3) != _votes(other, samples, 3)
