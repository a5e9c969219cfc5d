"""Chunk-level steps and modes: which stages each mode runs, and the final-answer rules."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from icd.config import MethodConfig, PolicyConfig
from icd.method.modes import MODES, mode_spec, plan
from icd.method.policy import PolicyState
from icd.method.steps import (
    choose_demos,
    final_answers,
    icl_mask,
    pool_mask,
    pool_vote,
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
    assert plan(MethodConfig(mode="random_demos")).selection.strategy == "random"
    assert plan(MethodConfig(mode="rices")).selection.strategy == "rices"
    assert plan(MethodConfig(mode="icd")).selection.strategy == "combined"
    forward = plan(MethodConfig(mode="teacher_forward"))
    assert not forward.uses_icl and forward.queries == "budget" and forward.forward_labels
    teacher = plan(MethodConfig(mode="teacher_zero_shot"))
    assert teacher.queries == "all" and not teacher.zero_shot and teacher.voting.n == 1
    assert plan(MethodConfig(mode="pool_vote")).icl == "pool_vote"
    lora = plan(MethodConfig(mode="finetune_lora"))
    assert lora.adapt and lora.zero_shot and not lora.zero_shot_ahead and not lora.uses_icl


def test_select_queries_skips_invalid_and_queries_follow_the_plan():
    policy = PolicyConfig(threshold="always", budget=None)
    u = np.array([0.1, np.nan, 0.3])
    q, state = select_queries(u, PolicyState(), policy, None, valid=np.array([True, False, True]))
    assert q.tolist() == [True, False, True] and state.seen == 2
    args = {"uncertainties": u, "state": state, "policy": policy, "stream_length": None}
    q, state2 = teacher_queries(3, queries="none", **args)
    assert not q.any() and state2 == state
    q, state3 = teacher_queries(3, queries="all", **args)
    assert q.all() and state3 == state


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
    assert pool_mask([*votes, None]).tolist() == [True, False, False, False]


def test_final_answers_icd():
    votes = [
        VoteResult("cat", ["cat"] * 5, 1.0, True),
        None,
        VoteResult(None, [], 0.0, False, error="x"),
        None,
    ]
    zs, icl = ["dog", "cow", "bird", None], ["dog2", "cow2", "bird2", None]
    got = final_answers(plan(MethodConfig()), zs, icl, votes)
    assert got == [
        ("cat", "teacher"),
        ("cow2", "student_icl"),
        ("bird2", "student_fallback"),
        (None, None),
    ]
    assert icl_mask(votes, forward_labels=True).tolist() == [False, True, True, True]
    keep_student = plan(MethodConfig(final_from_teacher=False))
    assert not keep_student.forward_labels
    assert final_answers(keep_student, zs, icl, votes)[0] == ("dog2", "student_icl")
    assert icl_mask(votes, forward_labels=False).all()


def test_final_answers_baselines():
    votes = [VoteResult("cat", ["cat"], 1.0, True), None, VoteResult(None, error="x")]
    zs, icl = ["dog", "cow", "bird"], [None, None, None]
    forward = plan(MethodConfig(mode="teacher_forward", final_from_teacher=False))
    assert final_answers(forward, zs, icl, votes) == [
        ("cat", "teacher"),
        ("cow", "student_zs"),
        ("bird", "student_fallback"),
    ]
    assert forward.forward_labels and not forward.uses_icl
    assert final_answers(plan(MethodConfig(mode="student_zero_shot")), zs, ["a", "b", "c"]) == [
        ("dog", "student_zs"),
        ("cow", "student_zs"),
        ("bird", "student_zs"),
    ]
    tzs = [VoteResult("cat", ["cat"], 1.0, True), VoteResult(None, error="x"), None]
    teacher = plan(MethodConfig(mode="teacher_zero_shot"))
    got = final_answers(teacher, [None, "cow", None], teacher_zs=tzs)
    assert got == [("cat", "teacher_zs"), ("cow", "student_fallback"), (None, None)]
    with pytest.raises(ValueError):
        final_answers(plan(MethodConfig()), ["a"], ["a", "b"])


def test_choose_demos_by_the_plans_selection():
    rng = np.random.default_rng(0)
    q, pool = (
        rng.standard_normal((3, 4)).astype(np.float32),
        rng.standard_normal((10, 4)).astype(np.float32),
    )
    labels = [str(i % 3) for i in range(10)]

    def sel(mode: str):
        return plan(MethodConfig(mode=mode)).selection

    rices = choose_demos(q, None, pool, pool, labels, selection=sel("rices"), seed=0)
    want = np.argsort(-(q @ pool.T), axis=1)[:, :3][:, ::-1]
    assert [r.tolist() for r in rices] == want.tolist()
    rnd = choose_demos(
        q,
        None,
        pool,
        pool,
        labels,
        selection=sel("random_demos"),
        seed=0,
        query_ids=["a", "b", "c"],
    )
    assert all(len(r) == 3 for r in rnd) and [r.tolist() for r in rnd] != want.tolist()


def test_student_outputs():
    answers, u = student_outputs([gen(" cat \n", 0.2), gen("", 0.0)], "entropy_mean")
    # an empty answer is maximally uncertain (it goes to the teacher)
    assert answers == ["cat", ""] and u.tolist() == pytest.approx([0.2, MAX_STAT])


@given(st.lists(st.sampled_from("abcd"), max_size=8), st.booleans())
def test_pool_vote_is_the_majority_with_ties_to_the_best_ranked_demo(labels, last) -> None:
    ranked = list(reversed(labels)) if last else labels  # best-ranked first
    got = pool_vote(labels, most_similar_last=last)
    if not labels:
        assert got is None
        return
    counts = {x: labels.count(x) for x in labels}
    assert counts[got] == max(counts.values())
    tied = [x for x in ranked if counts[x] == counts[got]]
    assert got == tied[0]


def test_pool_vote_mode_selects_demos_and_answers_from_them() -> None:
    cfg = plan(MethodConfig(mode="pool_vote"))
    spec = mode_spec("pool_vote")
    assert spec.use_icl and spec.use_pool and spec.query_teacher and spec.pool_vote
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
    policy = PolicyConfig(threshold="always", budget=1.0)
    mask, _ = teacher_queries(
        3,
        queries="budget",
        uncertainties=unc,
        state=PolicyState(),
        policy=policy,
        stream_length=None,
    )
    assert mask.tolist() == [True, False, True]


def test_config_literals_are_the_registries() -> None:
    """The config's allowed values are the method's registries, nothing more or less."""
    from typing import get_args

    from icd.config import SelectionConfig
    from icd.method.selection import STRATEGIES
    from icd.method.uncertainty import MEASURES, RANDOM

    assert set(get_args(MethodConfig.model_fields["mode"].annotation)) == set(MODES)
    measures = set(get_args(MethodConfig.model_fields["uncertainty"].annotation))
    assert measures == {*MEASURES, RANDOM}
    strategies = get_args(SelectionConfig.model_fields["strategy"].annotation)
    assert set(strategies) == set(STRATEGIES)


def test_the_inverted_gate_ablation_asks_where_the_student_is_most_certain():
    u = np.array([0.9, 0.1, 0.8, 0.05, 0.5, 0.7, 0.2, 0.3])
    policy = PolicyConfig(threshold="fixed", tau=-0.25, budget=0.25, warmup=0, invert=True)
    asked, _ = select_queries(u, PolicyState(), policy, stream_length=len(u))
    assert set(np.flatnonzero(asked)) <= {1, 3, 6}  # certain ones only, within the budget
    assert asked.sum() == 2
    normal, _ = select_queries(
        u, PolicyState(), policy.model_copy(update={"invert": False, "tau": 0.75}), len(u)
    )
    assert set(np.flatnonzero(normal)) <= {0, 2}
