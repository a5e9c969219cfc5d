"""Captioning: COCO BLEU and CIDEr-D against hand-computed values (the golden comparison
with pycocoevalcap itself is tests/method/test_metrics_golden.py), and consensus caption
voting."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from icd.config import VotingConfig
from icd.method.metrics import (
    caption_bleu,
    caption_tokens,
    corpus_bleu,
    corpus_cider,
    score,
)
from icd.method.prompts import build_prompt, format_question
from icd.method.types import Generation
from icd.method.voting import aggregate, aggregate_captions, caption_similarity, normalize_answer


@pytest.fixture(autouse=True)
def _python_ptb_tokenizer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Python PTB tokenizer (no JVM start per call): it equals the Java one on the golden
    captions (tests/method/test_metrics_golden.py checks both)."""
    monkeypatch.setenv("ICD_CAPTION_TOKENIZER", "ptb-python")


# -- BLEU ----------------------------------------------------------------------------


def test_identical_caption_scores_bleu_100() -> None:
    caption = "a small red star on a white background"
    assert corpus_bleu([caption], [[caption]]) == pytest.approx(100.0)
    assert caption_bleu(caption, [caption, "a red star"]) == pytest.approx(100.0)
    assert score(caption, [caption], "captioning") == pytest.approx(1.0)


def test_bleu_by_hand() -> None:
    # "a b c d e" vs "a b c d f": n-gram precisions 4/5, 3/4, 2/3, 1/2; same length, so no
    # brevity penalty: BLEU = (4/5 * 3/4 * 2/3 * 1/2) ** (1/4) = 0.2 ** 0.25.
    assert corpus_bleu(["a b c d e"], [["a b c d f"]]) == pytest.approx(100 * 0.2**0.25)
    assert caption_bleu("a b c d e", ["a b c d f"]) == pytest.approx(100 * 0.2**0.25)
    # Every n-gram right but two words short of the closest reference (6 words): brevity
    # penalty exp(1 - 6/4).
    assert corpus_bleu(["a b c d"], [["a b c d e f", "x y z w v u t s"]]) == pytest.approx(
        100 * math.exp(1 - 6 / 4)
    )
    # Case does not count (lowercased), punctuation neither (PTB tokens), and missing /
    # empty captions score 0.
    assert caption_bleu("A B C D E.", ["a b c d f"]) == pytest.approx(100 * 0.2**0.25)
    assert caption_bleu("A B C D E", ["a b c d f"]) == pytest.approx(100 * 0.2**0.25)
    assert caption_bleu(None, ["a b"]) == 0.0 and caption_bleu("  ", ["a b"]) == 0.0
    assert score(None, ["a red star"], "captioning") == 0.0


def test_corpus_bleu_takes_varying_numbers_of_references() -> None:
    # The second sample has one reference, the first two; both hypotheses match one exactly.
    value = corpus_bleu(["a b c d e", "v w x y z"], [["q r s t u", "a b c d e"], ["v w x y z"]])
    assert value == pytest.approx(100.0)
    with pytest.raises(ValueError, match="align"):
        corpus_bleu(["a"], [])


def test_bleu4_of_two_word_captions_is_zero_but_bleu1_is_not() -> None:
    preds = ["red star", "blue ring"]
    refs = [["a red star", "a small red star"], ["a blue ring", "a large blue donut"]]
    # no 3- or 4-grams anywhere: pycocoevalcap's BLEU smooths 0/0 precisions with
    # (0 + 1e-9) / (0 + 1e-15), which leaves BLEU-4 near 0 but not 0
    assert 0.0 < corpus_bleu(preds, refs) < 0.1
    # BLEU-1: every word right; the closest references are 3 words: BP = exp(1 - 6/4).
    assert corpus_bleu(preds, refs, max_order=1) == pytest.approx(100 * math.exp(1 - 6 / 4))


# -- CIDEr ---------------------------------------------------------------------------


def test_cider_by_hand() -> None:
    """Two images, one reference each: "a b" and "c d". Every n-gram occurs in one
    reference of two, so its weight is tf * log(2/1). Image 1's hypothesis "a b" equals its
    reference: cosine 1 for unigrams and bigrams, nothing for 3- and 4-grams (no such
    n-grams), so CIDEr-D = 10 * mean(1, 1, 0, 0) = 5. With "a c" instead: unigram vectors
    (a, c) and (a, b), each entry log 2, cosine 1/2; the bigram "a c" is not in the
    reference: 0. So 10 * mean(1/2, 0, 0, 0) = 1.25, and the corpus score (5 + 1.25) / 2."""
    refs = [["a b"], ["c d"]]
    assert corpus_cider(["a b", "c d"], refs) == pytest.approx(5.0)
    assert corpus_cider(["a c", "c d"], refs) == pytest.approx(3.125)
    # Tokenised like the COCO evaluation: case and punctuation do not count ...
    assert corpus_cider(["A, b!", "C; d?"], refs) == pytest.approx(5.0)
    # ... but PTB reads a single letter before a period as an abbreviation ("b." is a word)
    assert corpus_cider(["A, b.", "C d!"], refs) == pytest.approx(3.125)  # as "a c"
    # A missing caption counts as empty (0 for its image); samples without references
    # are left out.
    assert corpus_cider([None, "c d"], refs) == pytest.approx(2.5)
    assert corpus_cider(["a b", "c d", "zzz"], [*refs, []]) == pytest.approx(5.0)
    assert corpus_cider([], []) == 0.0


def test_caption_tokens() -> None:
    # the COCO evaluation's PTB tokens: hyphenated words stay whole, punctuation goes,
    # brackets stay as PTB's lowercased -lrb- / -rrb-, clitics split
    assert caption_tokens("  A Red-Star, on WHITE!  ") == "a red-star on white"
    assert (
        caption_tokens("The U.S. flag (it's 2.5 m)...") == "the u.s. flag -lrb- it 's 2.5 m -rrb-"
    )


# -- prompt --------------------------------------------------------------------------


def test_captioning_prompt_asks_for_one_sentence_and_lists_no_options() -> None:
    from PIL import Image

    text = format_question("What is shown in the image?", "captioning", ["red star"])
    assert text == "What is shown in the image? Describe the image in one short sentence."
    img = Image.new("RGB", (8, 8))
    p = build_prompt("", img, [(img, "", "a small red star")], task="captioning")
    assert p.messages[1]["content"][0]["text"] == "a small red star"
    assert len(p.images) == 2


# -- consensus voting ----------------------------------------------------------------


def gen(text: str, logprobs: list[float] | None = None) -> Generation:
    lps = np.array(logprobs if logprobs is not None else [-0.1] * max(1, len(text.split())))
    return Generation(text=text, token_logprobs=lps, token_entropy=np.zeros(len(lps)))


CONSENSUS = VotingConfig(n=5, aggregation="consensus", a_min=0.5)


def test_consensus_picks_the_caption_closest_to_the_others() -> None:
    captions = [
        "a red star on a white background",
        "a blue circle",
        "a small red star",
        "a small red star in the corner",
        "red star",
    ]
    result = aggregate_captions([gen(c) for c in captions], CONSENSUS)
    assert result.label == "a small red star"
    assert result.answer == result.label
    assert result.votes == captions
    # agreement: the winner's mean similarity to the four others, by hand
    others = [c for c in captions if c != "a small red star"]
    expected = sum(caption_similarity("a small red star", c) for c in others) / 4
    assert result.agreement == pytest.approx(expected)
    assert result.accepted == (expected >= 0.5)


def test_caption_similarity_by_hand() -> None:
    # "small red star" vs "red star" (articles dropped): n-grams {small, red, star,
    # small red, red star} vs {red, star, red star}: 3 shared of 5.
    assert caption_similarity("a small red star", "the red star") == pytest.approx(3 / 5)
    assert caption_similarity("A red star.", "a red star") == 1.0
    assert caption_similarity("red star", "star red") == pytest.approx(2 / 4)  # order counts
    assert caption_similarity("red star", "blue ring") == 0.0
    assert caption_similarity("", "red star") == 0.0


def test_agreement_and_acceptance() -> None:
    same = aggregate_captions([gen("A red star."), gen("a red star")] * 2, CONSENSUS)
    assert same.agreement == 1.0 and same.accepted
    assert same.label in ("A red star.", "a red star")
    apart = aggregate_captions([gen("red star"), gen("blue ring"), gen("green box")], CONSENSUS)
    assert apart.agreement == 0.0 and not apart.accepted
    one = aggregate_captions([gen("a red star")], CONSENSUS)
    assert one.agreement == 1.0 and one.label == "a red star"
    # Empty captions never win, and count as disagreeing.
    mixed = aggregate_captions([gen("a red star"), gen(""), gen("a red star")], CONSENSUS)
    assert mixed.label == "a red star" and mixed.agreement == pytest.approx(0.5)
    assert aggregate_captions([gen(""), gen("  ")], CONSENSUS).label is None


def test_majority_means_consensus_for_captions_and_plurality_for_classes() -> None:
    captions = [gen(c) for c in ["a red star", "a small red star", "a red star shape"]]
    majority = aggregate(captions, VotingConfig(aggregation="majority"), task="captioning")
    consensus = aggregate(captions, VotingConfig(aggregation="consensus"), task="captioning")
    assert majority == consensus and majority.label == "a red star"
    answers = [gen(a) for a in ["red star", "blue ring", "red star"]]
    classes = ["red star", "blue ring"]
    for how in ("majority", "consensus"):
        result = aggregate(answers, VotingConfig(aggregation=how), classes)
        assert result.label == "red star" and result.agreement == pytest.approx(2 / 3)


def test_best_of_n_ranks_captions_by_mean_token_logprob() -> None:
    short = gen("red star", [-0.5, -0.5])  # sum -1.0, mean -0.5
    long = gen("a small red star on white", [-0.2] * 6)  # sum -1.2, mean -0.2
    cfg = VotingConfig(aggregation="best_of_n", a_min=0.0)
    result = aggregate_captions([short, long, gen("blue ring", [-3.0, -3.0])], cfg)
    assert result.label == "a small red star on white"  # a summed log-prob would pick "red star"
    expected = (caption_similarity(long.text, short.text) + 0.0) / 2
    assert result.agreement == pytest.approx(expected)


# -- properties ----------------------------------------------------------------------

WORDS = ["a", "red", "blue", "star", "ring", "small", "on", "white", "the", "box"]
caption_st = st.lists(st.sampled_from(WORDS), min_size=0, max_size=6).map(" ".join)


@settings(max_examples=200, deadline=None)
@given(st.lists(caption_st, min_size=1, max_size=9), st.randoms(use_true_random=False))
def test_consensus_does_not_depend_on_the_order_of_the_samples(captions, rnd) -> None:
    gens = [gen(c, [-0.1 * (i % 3 + 1)] * max(1, len(c.split()))) for i, c in enumerate(captions)]
    shuffled = gens[:]
    rnd.shuffle(shuffled)
    for how in ("consensus", "best_of_n"):
        cfg = VotingConfig(aggregation=how)
        a, b = aggregate_captions(gens, cfg), aggregate_captions(shuffled, cfg)
        assert (a.label, a.agreement, a.accepted) == (b.label, b.agreement, b.accepted)
        assert sorted(a.votes) == sorted(b.votes)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(caption_st, min_size=1, max_size=9),
    st.integers(min_value=1, max_value=6).map(
        lambda k: " ".join(random.Random(k).sample(WORDS, 3))
    ),
    st.randoms(use_true_random=False),
)
def test_a_caption_repeated_by_a_strict_majority_wins(others, winner, rnd) -> None:
    others = [c for c in others if normalize_answer(c) != normalize_answer(winner)]
    n = len(others)
    m = n + 1  # strictly more copies than all the other samples together
    spellings = [winner, winner.upper(), winner + ".", "  " + winner]
    captions = [spellings[i % len(spellings)] for i in range(m)] + others
    rnd.shuffle(captions)
    result = aggregate_captions([gen(c) for c in captions], VotingConfig(aggregation="consensus"))
    assert normalize_answer(result.label) == normalize_answer(winner)


@settings(max_examples=200, deadline=None)
@given(st.lists(caption_st, min_size=2, max_size=8))
def test_the_winner_has_the_highest_mean_similarity_brute_force(captions) -> None:
    result = aggregate_captions([gen(c) for c in captions], VotingConfig(aggregation="consensus"))
    if all(not normalize_answer(c) for c in captions):
        assert result.label is None
        return

    def mean_sim(i: int) -> float:
        return sum(
            caption_similarity(captions[i], captions[j]) for j in range(len(captions)) if j != i
        ) / (len(captions) - 1)

    best = max(mean_sim(i) for i, c in enumerate(captions) if normalize_answer(c))
    assert result.agreement == pytest.approx(best)
    assert 0.0 <= result.agreement <= 1.0


@settings(max_examples=300, deadline=None)
@given(caption_st, caption_st, caption_st)
def test_caption_distance_obeys_the_triangle_inequality(a, b, c) -> None:
    """What the majority guarantee rests on: 1 - similarity is a metric (here on
    non-empty captions; an empty one is at distance 1 from everything)."""
    d = lambda x, y: 1 - Fraction(caption_similarity(x, y))  # noqa: E731
    assert caption_similarity(a, b) == caption_similarity(b, a)
    if all(normalize_answer(x) for x in (a, b, c)):
        assert d(a, c) <= d(a, b) + d(b, c) + Fraction(1, 10**12)
