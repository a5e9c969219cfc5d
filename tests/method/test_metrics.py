"""Metrics: VQA accuracy by its definition, classification match, demo accuracy, chunk
summaries that merge exactly."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from icd.method.metrics import chunk_metrics, demo_accuracy, merge_metrics, score, vqa_accuracy


def ten(matching: int, answer: str = "2", other: str = "3") -> list[str]:
    return [answer] * matching + [other] * (10 - matching)


@pytest.mark.parametrize(
    "matching, expected",
    [
        # Average over the 10 leave-one-out subsets of min(#matches in the other 9 / 3, 1):
        (0, 0.0),
        (1, (1 * 0 + 9 * (1 / 3)) / 10),  # = 0.3
        (2, (2 * (1 / 3) + 8 * (2 / 3)) / 10),  # = 0.6
        (3, (3 * (2 / 3) + 7 * 1) / 10),  # = 0.9
        (4, 1.0),
        (10, 1.0),
    ],
)
def test_vqa_accuracy_official_definition(matching, expected):
    assert vqa_accuracy("2", ten(matching)) == pytest.approx(expected)
    assert expected == pytest.approx({0: 0, 1: 0.3, 2: 0.6, 3: 0.9, 4: 1, 10: 1}[matching])


def test_vqa_accuracy_normalises_both_sides():
    answers = ["two", "2", "Two.", "3", "3", "3", "3", "3", "3", "3"]
    assert vqa_accuracy("2", answers) == pytest.approx(0.9)
    assert vqa_accuracy("The 2!", answers) == pytest.approx(0.9)
    assert score("2", answers, "vqa") == pytest.approx(0.9)
    assert vqa_accuracy("yes", ["Yes"]) == 1.0  # one reference: exact match
    assert vqa_accuracy(None, answers) == 0.0 and vqa_accuracy("", answers) == 0.0
    assert vqa_accuracy("2", []) == 0.0


def test_classification_match_with_synonyms():
    syn = {"tabby cat": ["tabby", "striped cat"]}
    assert score("Tabby Cat.", ["tabby cat"], "classification", syn) == 1.0
    assert score("a striped cat", ["tabby cat"], "classification", syn) == 1.0
    assert score("cat", ["tabby cat"], "classification", syn) == 0.0
    assert score("tabby", ["tabby cat"], "classification") == 0.0  # without synonyms
    assert score(None, ["tabby cat"], "classification") == 0.0
    with pytest.raises(ValueError):
        score("x", ["x"], "retrieval")


def test_student_answers_map_onto_classes_like_teacher_votes():
    from icd.config import VotingConfig
    from icd.method.types import Generation
    from icd.method.voting import aggregate

    classes = ["red circle", "blue star", "green square"]
    syn = {"blue star": ["azure star"]}
    for answer, truth in [
        ("a red circle shape", "red circle"),  # containment
        ("red circel", "red circle"),  # fuzzy
        ("Azure star!", "blue star"),  # synonym
    ]:
        vote = aggregate([Generation(answer, [], [])], VotingConfig(a_min=0), classes, syn)
        assert vote.label == truth  # the teacher's vote counts for the true class ...
        # ... and the same answer from the student scores right
        assert score(answer, [truth], "classification", syn, classes) == 1.0
    # ambiguous or wrong answers stay wrong
    assert score("red circle or blue star", ["red circle"], "classification", syn, classes) == 0
    assert score("green square", ["red circle"], "classification", syn, classes) == 0.0
    # fuzzy matching off: exact and synonyms only, as in voting
    assert score("red circel", ["red circle"], "classification", None, classes, 1.0) == 0.0


def test_chunk_metrics_score_student_answers_with_the_class_mapping():
    row = {
        "answers": ["red circle"],
        "zs_answer": "a red circle shape",
        "icl_answer": "red circel",
        "score": 1.0,
    }
    m = chunk_metrics([row], "classification", 5, 0, None, ["red circle", "blue star"])
    assert (m["zs_accuracy"], m["icl_accuracy"]) == (1.0, 1.0)
    unmapped = chunk_metrics([row], "classification", 5, 0)
    assert (unmapped["zs_accuracy"], unmapped["icl_accuracy"]) == (0.0, 0.0)


def test_demo_accuracy():
    assert demo_accuracy(["cat", "Cat", "dog", "tabby"], "cat") == 0.5
    assert demo_accuracy(["cat", "tabby"], "cat", {"cat": ["tabby"]}) == 1.0
    assert demo_accuracy([], "cat") is None
    assert demo_accuracy(["2", "3"], ["two", "2"]) == 0.5


def row(**kw):
    base = dict(
        skip_reason=None,
        answers=["cat"],
        score=None,
        zs_answer=None,
        icl_answer=None,
        queried=False,
        accepted=False,
        agreement=None,
        teacher_error=None,
        demo_accuracy=None,
        final_source=None,
    )
    base.update(kw)
    return base


def example_rows():
    return [
        row(
            score=1.0,
            zs_answer="dog",
            icl_answer="cat",
            final_source="student_icl",
            demo_accuracy=0.5,
        ),
        row(
            score=1.0,
            zs_answer="cat",
            queried=True,
            accepted=True,
            agreement=0.8,
            teacher_label="cat",
            final_source="teacher",
        ),
        row(
            score=0.0,
            zs_answer="dog",
            queried=True,
            accepted=False,
            agreement=0.4,
            teacher_label="cat",
            final_source="student_zs",
        ),
        row(
            score=0.0,
            zs_answer="dog",
            queried=True,
            teacher_error="timeout",
            final_source="student_fallback",
        ),
        row(skip_reason="bad image"),
        row(score=1.0, final_source="teacher_zs"),
    ]


def test_chunk_metrics_counts():
    m = chunk_metrics(example_rows(), "classification", n_votes=5, pool_size=12)
    assert m["samples"] == 6 and m["skipped"] == 1
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["zs_accuracy"] == pytest.approx(1 / 4) and m["icl_accuracy"] == 1.0
    # forwarding: the two teacher labels (both right) replace zero-shot answers dog/cat
    assert m["forward_accuracy"] == pytest.approx(2 / 4)
    assert m["queried"] == 3 and m["accepted"] == 1 and m["teacher_errors"] == 1
    assert m["annotation_rate"] == pytest.approx(3 / 5)
    assert m["teacher_calls"] == 3 * 5 + 1  # all N answers of each queried sample + one zs call
    assert m["mean_agreement"] == pytest.approx(0.6) and m["agreement_min"] == 0.4
    assert m["demo_accuracy"] == 0.5 and m["pool_size"] == 12
    assert m["source_teacher"] == 1 and m["source_student_fallback"] == 1
    empty = chunk_metrics([], "classification", 5, 0)
    assert empty["accuracy"] is None and empty["annotation_rate"] is None


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 5), max_size=20), st.integers(0, 20))
def test_merged_chunks_equal_the_whole(picks, cut):
    rows = [example_rows()[i] for i in picks]
    whole = chunk_metrics(rows, "classification", 5, 7)
    a = chunk_metrics(rows[:cut], "classification", 5, 3)
    b = chunk_metrics(rows[cut:], "classification", 5, 7)
    merged = merge_metrics(merge_metrics(None, a), b)
    assert merged.keys() == whole.keys()
    for key, value in whole.items():
        assert merged[key] == pytest.approx(value), key
