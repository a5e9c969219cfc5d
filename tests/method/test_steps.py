"""Chunk-level steps and modes: which stages each mode runs, and the final-answer rules."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from icd.config import MethodConfig, PolicyConfig
from icd.method.modes import MODES, mode_spec, selection_config
from icd.method.policy import PolicyState
from icd.method.steps import (
    choose_demos,
    demo_vote,
    final_answers,
    icl_mask,
    pool_mask,
    select_queries,
    student_outputs,
    teacher_queries,
    vote_annotations,
)
from icd.method.types import Generation
from icd.method.uncertainty import MAX_STAT
from icd.method.voting import VoteResult


def gen(text: str, ent: float = 0.5) -> Generation:
    return Generation(text, np.array([-ent]), np.array([ent]))


@dataclass
class Ann:
    generations: list[Generation] = field(default_factory=list)
    error: str | None = None


def test_every_mode_has_a_spec():
    modes = MethodConfig.model_fields["mode"].annotation.__args__
    assert set(modes) == set(MODES)
    with pytest.raises(ValueError, match="unknown mode"):
        mode_spec("oracle")
    assert selection_config(MethodConfig(mode="random_demos")).strategy == "random"
    assert selection_config(MethodConfig(mode="rices")).strategy == "rices"
    assert selection_config(MethodConfig(mode="icd")).strategy == "combined"
    assert not mode_spec("teacher_forward").use_icl and mode_spec("teacher_forward").query_teacher
    assert mode_spec("teacher_zero_shot").teacher_on_all


def test_select_queries_skips_invalid_and_respects_the_mode():
    cfg = MethodConfig(policy=PolicyConfig(threshold="always", budget=None))
    u = np.array([0.1, np.nan, 0.3])
    q, state = select_queries(u, PolicyState(), cfg, None, valid=np.array([True, False, True]))
    assert q.tolist() == [True, False, True] and state.seen == 2
    q, state2 = select_queries(u, state, MethodConfig(mode="student_zero_shot"), None)
    assert not q.any() and state2 == state


def test_vote_annotations_and_pool_mask():
    cfg = MethodConfig()
    anns = [
        Ann([gen("cat"), gen("Cat"), gen("cat."), gen("dog"), gen("cat")]),
        Ann([gen("cat"), gen("dog"), gen("cow"), gen("dog"), gen("bird")]),
        Ann(error="HTTP 500 after 5 retries"),
    ]
    votes = vote_annotations(anns, cfg.voting, ["cat", "dog"])
    assert [v.label for v in votes] == ["cat", "dog", None]
    assert [v.accepted for v in votes] == [True, False, False]
    assert votes[2].error == "HTTP 500 after 5 retries"
    assert pool_mask([*votes, None], cfg).tolist() == [True, False, False, False]
    assert not pool_mask(votes, MethodConfig(mode="teacher_forward")).any()


def test_final_answers_icd():
    votes = [
        VoteResult("cat", ["cat"] * 5, 1.0, True),
        None,
        VoteResult(None, [], 0.0, False, error="x"),
        None,
    ]
    zs, icl = ["dog", "cow", "bird", None], ["dog2", "cow2", "bird2", None]
    got = final_answers(MethodConfig(), zs, icl, votes)
    assert got == [
        ("cat", "teacher"),
        ("cow2", "student_icl"),
        ("bird2", "student_fallback"),
        (None, None),
    ]
    assert icl_mask(votes, MethodConfig()).tolist() == [False, True, True, True]
    keep_student = MethodConfig(final_from_teacher=False)
    assert final_answers(keep_student, zs, icl, votes)[0] == ("dog2", "student_icl")
    assert icl_mask(votes, keep_student).all()


def test_final_answers_baselines():
    votes = [VoteResult("cat", ["cat"], 1.0, True), None, VoteResult(None, error="x")]
    zs, icl = ["dog", "cow", "bird"], [None, None, None]
    forward = MethodConfig(mode="teacher_forward", final_from_teacher=False)
    assert final_answers(forward, zs, icl, votes) == [
        ("cat", "teacher"),
        ("cow", "student_zs"),
        ("bird", "student_fallback"),
    ]
    assert not icl_mask(votes, forward).any()
    assert final_answers(MethodConfig(mode="student_zero_shot"), zs, ["a", "b", "c"]) == [
        ("dog", "student_zs"),
        ("cow", "student_zs"),
        ("bird", "student_zs"),
    ]
    tzs = [VoteResult("cat", ["cat"], 1.0, True), VoteResult(None, error="x"), None]
    got = final_answers(MethodConfig(mode="teacher_zero_shot"), [None, "cow", None], teacher_zs=tzs)
    assert got == [("cat", "teacher_zs"), ("cow", "student_fallback"), (None, None)]
    with pytest.raises(ValueError):
        final_answers(MethodConfig(), ["a"], ["a", "b"])


def test_choose_demos_by_mode():
    rng = np.random.default_rng(0)
    q, pool = (
        rng.standard_normal((3, 4)).astype(np.float32),
        rng.standard_normal((10, 4)).astype(np.float32),
    )
    labels = [str(i % 3) for i in range(10)]
    rices = choose_demos(q, None, pool, pool, labels, MethodConfig(mode="rices"), seed=0)
    want = np.argsort(-(q @ pool.T), axis=1)[:, :3][:, ::-1]
    assert [r.tolist() for r in rices] == want.tolist()
    none = choose_demos(q, None, pool, pool, labels, MethodConfig(mode="teacher_forward"), seed=0)
    assert all(len(r) == 0 for r in none)
    rnd = choose_demos(
        q, None, pool, pool, labels, MethodConfig(mode="random_demos"), 0, ["a", "b", "c"]
    )
    assert all(len(r) == 3 for r in rnd) and [r.tolist() for r in rnd] != want.tolist()


def test_student_outputs():
    answers, u = student_outputs([gen(" cat \n", 0.2), gen("", 0.0)], "entropy_mean")
    # an empty answer is maximally uncertain (it goes to the teacher)
    assert answers == ["cat", ""] and u.tolist() == pytest.approx([0.2, MAX_STAT])


@given(st.lists(st.sampled_from("abcd"), max_size=8), st.booleans())
def test_demo_vote_is_the_majority_with_ties_to_the_best_ranked_demo(labels, last) -> None:
    ranked = list(reversed(labels)) if last else labels  # best-ranked first
    got = demo_vote(labels, most_similar_last=last)
    if not labels:
        assert got is None
        return
    counts = {x: labels.count(x) for x in labels}
    assert counts[got] == max(counts.values())
    tied = [x for x in ranked if counts[x] == counts[got]]
    assert got == tied[0]


def test_pool_vote_mode_selects_demos_and_answers_from_them() -> None:
    cfg = MethodConfig(mode="pool_vote")
    spec = mode_spec("pool_vote")
    assert spec.use_icl and spec.use_pool and spec.query_teacher and spec.demo_vote
    assert spec.uses_budget
    v = VoteResult("cat", ["cat"], 1.0, True)
    assert final_answers(cfg, ["dog", "dog"], ["bird", "bird"], [v, None]) == [
        ("cat", "teacher"),
        ("bird", "pool_vote"),
    ]
    assert final_answers(cfg, ["dog"], [None], [None]) == [("dog", "student_zs")]


def test_a_failed_student_answer_is_skipped_by_the_policy() -> None:
    failed = Generation("", np.zeros(0), np.zeros(0), error="student_error: 500 after 5 retries")
    answers, unc = student_outputs([gen("cat", 5.0), failed, gen("dog", 9.0)], "entropy_mean")
    assert answers == ["cat", None, "dog"] and np.isnan(unc[1])
    cfg = MethodConfig(policy=PolicyConfig(threshold="always", budget=1.0))
    mask, _ = teacher_queries(
        3, uncertainties=unc, state=PolicyState(), cfg=cfg, stream_length=None
    )
    assert mask.tolist() == [True, False, True]
