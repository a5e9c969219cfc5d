"""Teacher voting: normalisation, closed-set mapping, majority / best-of-N, and the
noise-filtering effect of voting on a simulated noisy teacher."""

from __future__ import annotations

import math
from collections import Counter
from itertools import combinations_with_replacement

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from icd.config import VotingConfig
from icd.method.types import Generation
from icd.method.voting import VoteResult, aggregate, map_to_class, normalize_answer

CLASSES = ["red circle", "blue square", "green triangle", "circle", "tabby cat"]
SYNONYMS = {"tabby cat": ["tabby", "striped cat"], "blue square": ["azure square"]}


def g(text: str, logprob: float = -1.0) -> Generation:
    return Generation(text, np.array([logprob]), np.array([0.5]))


@pytest.mark.parametrize(
    "raw, norm",
    [
        ("The Red-Circle!", "red circle"),
        ("  a   BLUE\tsquare. ", "blue square"),
        ("ＲＥＤ ｃｉｒｃｌｅ", "red circle"),  # full-width (NFKC)
        ("Straße", "strasse"),  # casefold
        ("don't", "dont"),
        ("It’s an apple", "its apple"),
        ("1,000 people", "1000 people"),
        ("2.5 kg.", "2.5 kg"),
        ("Two dogs", "2 dogs"),
        ("the", ""),
        ("", ""),
    ],
)
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


@pytest.mark.parametrize(
    "answer, mapped",
    [
        ("Red circle.", "red circle"),  # exact
        ("circle", "circle"),  # exact beats containment in "red circle"
        ("Tabby", "tabby cat"),  # synonym
        ("a striped cat", "tabby cat"),  # synonym after normalisation
        ("red circel", "red circle"),  # fuzzy
        ("It is a big red circle", "red circle"),  # containment: longest name wins
        ("blue square or green triangle", "blue square or green triangle"),  # ambiguous
        ("purple hexagon", "purple hexagon"),  # unmapped stays itself
        ("", ""),
    ],
)
def test_map_to_class(answer, mapped):
    assert map_to_class(answer, CLASSES, SYNONYMS, 0.85) == mapped


def test_fuzzy_off_and_open_set():
    assert map_to_class("red circel", CLASSES, SYNONYMS, 1.0) == "red circel"
    assert map_to_class("It is a red circle", CLASSES, None, 1.0) == "it is red circle"
    assert map_to_class("Tabby", CLASSES, SYNONYMS, 1.0) == "tabby cat"
    assert map_to_class("The Answer!", None) == "answer"


def test_ambiguous_synonym_is_not_mapped():
    syn = {"red circle": ["disc"], "circle": ["disc"]}
    assert map_to_class("disc", CLASSES, syn, 1.0) == "disc"


def test_majority_agreement_and_acceptance():
    cfg = VotingConfig(n=5, a_min=0.6)
    r = aggregate(
        [g("circle"), g("Circle."), g("tabby"), g("the circle"), g("square")],
        cfg,
        CLASSES,
        SYNONYMS,
    )
    votes = ["circle", "circle", "tabby cat", "circle", "square"]
    assert r == VoteResult(
        "circle", votes, 0.6, True, answer="Circle."
    )  # equal log-probs: min text
    r = aggregate(
        [g("circle"), g("circle"), g("tabby"), g("dog"), g("cow")], cfg, CLASSES, SYNONYMS
    )
    assert r.label == "circle" and r.agreement == 0.4 and not r.accepted


def test_tie_break_by_summed_logprob_then_name():
    cfg = VotingConfig(a_min=0.0)
    gens = [g("circle", -1.0), g("circle", -1.0), g("tabby", -0.5), g("tabby", -0.6), g("x", -0.1)]
    assert aggregate(gens, cfg, CLASSES, SYNONYMS).label == "tabby cat"
    gens = [g("circle", -1.0), g("tabby", -1.0)]
    assert aggregate(gens, cfg, CLASSES, SYNONYMS).label == "circle"  # lexicographic


def test_answer_keeps_the_teachers_spelling():
    cfg = VotingConfig(a_min=0.0)
    r = aggregate([g("Don't know.", -2.0), g("dont know", -1.0), g(" Don’t know ", -0.5)], cfg)
    assert r.label == "dont know" and r.answer == "Don’t know" and r.agreement == 1.0


def test_best_of_n():
    cfg = VotingConfig(aggregation="best_of_n", a_min=0.5)
    gens = [g("circle", -3.0), g("circle", -2.0), g("tabby", -0.2), g("circle", -2.5)]
    r = aggregate(gens, cfg, CLASSES, SYNONYMS)
    assert r.label == "tabby cat" and r.agreement == 0.25 and not r.accepted


def test_empty_answers_never_win():
    cfg = VotingConfig(a_min=0.0)
    r = aggregate([g(""), g("  "), g("circle"), g("...")], cfg, CLASSES)
    assert r.label == "circle" and r.agreement == 0.25
    r = aggregate([g(""), g("the")], cfg, CLASSES)
    assert r.label is None and not r.accepted
    assert aggregate([], cfg, CLASSES).label is None


def respell(draw, text: str) -> str:
    """A normalisation-equivalent spelling of ``text``."""
    words = text.split()
    out = []
    for w in words:
        case = draw(st.sampled_from(["lower", "upper", "title"]))
        w = {"lower": w.lower(), "upper": w.upper(), "title": w.title()}[case]
        if draw(st.booleans()):
            w = draw(st.sampled_from(["the ", "a ", "An "])) + w
        out.append(w)
    sep = draw(st.sampled_from([" ", "  ", " \t", "\u3000"]))
    return sep.join(out) + draw(st.sampled_from(["", ".", "!", " ?", "…"]))


answers = st.sampled_from(
    ["red circle", "blue square", "tabby cat", "dog", "circle", "big red circle"]
)


@settings(max_examples=120, deadline=None)
@given(
    data=st.data(),
    texts=st.lists(answers, min_size=1, max_size=7),
    logprobs=st.lists(st.floats(-5, 0), min_size=7, max_size=7),
    aggregation=st.sampled_from(["majority", "best_of_n"]),
    classes=st.sampled_from([CLASSES, None]),
)
def test_vote_invariant_to_order_and_spelling(data, texts, logprobs, aggregation, classes):
    cfg = VotingConfig(aggregation=aggregation, a_min=0.4)
    gens = [g(t, lp) for t, lp in zip(texts, logprobs, strict=False)]
    base = aggregate(gens, cfg, classes, SYNONYMS)

    perm = data.draw(st.permutations(range(len(gens))))
    shuffled = aggregate([gens[i] for i in perm], cfg, classes, SYNONYMS)
    respelled = aggregate(
        [g(respell(data.draw, x.text), x.seq_logprob) for x in gens], cfg, classes, SYNONYMS
    )
    for other in (shuffled, respelled):
        assert (other.label, other.agreement, other.accepted) == (
            base.label,
            base.agreement,
            base.accepted,
        )
        assert sorted(other.votes) == sorted(base.votes)
    assert shuffled.answer == base.answer
    assert base.agreement == Counter(base.votes)[base.label] / len(gens)


# --- Simulation: a noisy oracle teacher, N = 5 votes, majority + a_min --------------------


def predicted_vote_outcome(p_noise: float, n_votes: int, n_classes: int, a_min: float):
    """Exact P(accepted), P(accepted and wrong) and P(majority wrong) by enumerating the
    vote-count vectors: each vote is right w.p. 1 - p, else uniform over the other classes;
    ties go to a uniformly random tied class (the log-prob tie-break with iid log-probs)."""
    wrong = n_classes - 1
    p_acc = p_acc_wrong = p_major_wrong = 0.0
    for c in range(n_votes + 1):  # votes for the true class
        m = n_votes - c
        p_c = math.comb(n_votes, c) * (1 - p_noise) ** c * p_noise**m
        # Distribute the m wrong votes over the wrong classes: enumerate multisets of classes.
        for combo in combinations_with_replacement(range(wrong), m):
            counts = Counter(combo)
            # number of ordered sequences giving this multiset / wrong**m
            ways = math.factorial(m)
            for k in counts.values():
                ways //= math.factorial(k)
            p = p_c * ways / wrong**m
            top_wrong = max(counts.values(), default=0)
            top = max(c, top_wrong)
            tied = sum(1 for k in counts.values() if k == top) + (c == top)
            p_true_wins = (c == top) / tied
            if top / n_votes >= a_min:
                p_acc += p
                p_acc_wrong += p * (1 - p_true_wins)
            p_major_wrong += p * (1 - p_true_wins)
    return p_acc, p_acc_wrong, p_major_wrong


def simulate(p_noise, n_votes, n_classes, n_samples, cfg, seed=0):
    rng = np.random.default_rng(seed)
    classes = [f"class {i}" for i in range(n_classes)]
    accepted = accepted_wrong = majority_wrong = single_wrong = 0
    for _ in range(n_samples):
        truth = int(rng.integers(n_classes))
        gens = []
        for _ in range(n_votes):
            if rng.random() < p_noise:
                label = int(rng.integers(n_classes - 1))
                label += label >= truth  # uniform over the other classes
            else:
                label = truth
            gens.append(g(classes[label].upper() + ".", float(rng.normal(-1.0, 0.3))))
        r = aggregate(gens, cfg, classes)
        single_wrong += r.votes[0] != classes[truth]
        majority_wrong += r.label != classes[truth]
        if r.accepted:
            accepted += 1
            accepted_wrong += r.label != classes[truth]
    return (
        accepted / n_samples,
        accepted_wrong / accepted,
        majority_wrong / n_samples,
        single_wrong / n_samples,
    )


def test_voting_filters_a_noisy_teacher_as_the_binomial_math_predicts():
    p, n_votes, n_classes, n_samples = 0.3, 5, 20, 5000
    cfg = VotingConfig(n=n_votes, a_min=0.6)
    p_acc, p_acc_wrong, p_major_wrong = predicted_vote_outcome(p, n_votes, n_classes, cfg.a_min)
    predicted_error = p_acc_wrong / p_acc
    # Hand check of the dominant terms: the true class gets >= 3 of 5 votes w.p. 0.83692.
    assert p_acc - p_acc_wrong == pytest.approx(0.83692, abs=1e-5)
    assert predicted_error == pytest.approx(0.000872, abs=2e-5)

    rate, error, majority_error, single_error = simulate(p, n_votes, n_classes, n_samples, cfg)
    print(
        f"\npredicted: acceptance {p_acc:.4f}, accepted-label error {predicted_error:.5f}, "
        f"majority error {p_major_wrong:.4f}; simulated: acceptance {rate:.4f}, "
        f"accepted-label error {error:.5f}, majority error {majority_error:.4f}, "
        f"single-vote error {single_error:.4f}"
    )
    assert abs(single_error - p) < 0.02  # the teacher's own noise
    assert error < p - 0.29  # voting + a_min removes nearly all of the 30% noise
    assert abs(rate - p_acc) < 0.02  # ~4 standard errors
    assert abs(error - predicted_error) < 0.003  # ~3 standard errors of ~4,200 accepted labels
    assert abs(majority_error - p_major_wrong) < 0.012


def test_the_minority_vote_ablation_labels_by_the_least_voted_answer():
    cfg = VotingConfig(n=5, a_min=0.0, minority=True)
    r = aggregate(
        [g("circle"), g("circle"), g("circle"), g("square"), g("square")], cfg, CLASSES, SYNONYMS
    )
    assert r.label == "square" and r.agreement == 0.4
    majority = aggregate(
        [g("circle"), g("circle"), g("circle"), g("square"), g("square")],
        cfg.model_copy(update={"minority": False}),
        CLASSES,
        SYNONYMS,
    )
    assert majority.label == "circle" and majority.agreement == 0.6
