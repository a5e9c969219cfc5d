"""Metrics: VQA accuracy by its definition, classification match, demo accuracy, chunk
summaries that merge exactly."""

from __future__ import annotations

import pytest

from icd.method.metrics import demo_accuracy, score, vqa_accuracy


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


def test_demo_accuracy():
    assert demo_accuracy(["cat", "Cat", "dog", "tabby"], "cat") == 0.5
    assert demo_accuracy(["cat", "tabby"], "cat", {"cat": ["tabby"]}) == 1.0
    assert demo_accuracy([], "cat") is None
    assert demo_accuracy(["2", "3"], ["two", "2"]) == 0.5
