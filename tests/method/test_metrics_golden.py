"""ICD's metrics against the official evaluation tools, case by case.

The golden files hold the official tools' outputs, made once by
``tests/golden/make_goldens.py`` (its docstring says how): the VQA challenge's
``vqaEval.py`` and lmms-eval's VQAv2 / TextVQA scoring on 3,000 answer cases, and
pycocoevalcap (PTB tokenizer through Java, ``Bleu(4)``, ``Cider``) on 300 caption sets.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from icd.method.metrics import coco_caption_metrics, ptb_tokenize, vqa_accuracy, vqa_normalize

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
TOL = 1e-9


@cache
def _load(name: str) -> dict[str, Any]:
    with gzip.open(GOLDEN / name, "rt", encoding="utf-8") as f:
        return json.load(f)


def vqa_cases() -> list[dict[str, Any]]:
    return _load("vqa_accuracy.json.gz")["cases"]


def caption_sets() -> list[dict[str, Any]]:
    return _load("caption_metrics.json.gz")["sets"]


def test_golden_files_are_big_enough_and_cover_the_hard_cases() -> None:
    cases = vqa_cases()
    assert len(cases) >= 2000
    categories = {c["category"] for c in cases}
    assert {"punctuation", "contractions", "numbers", "articles", "money", "times"} <= categories
    assert {"unicode", "whitespace", "identical_refs", "fuzz"} <= categories
    assert any(c["pred"] == "" for c in cases) and any("" in c["answers"] for c in cases)
    assert {len(c["answers"]) for c in cases} == set(range(1, 11))  # fewer than 10 too
    assert len(caption_sets()) >= 200


def test_vqa_accuracy_equals_the_official_processing_on_every_case() -> None:
    """Every case: the official tool's own processing applied to every answer (lmms-eval's
    VQAv2 rule), leave-one-annotator-out averaged; one reference answer: exact match."""
    wrong = [
        (c["pred"], c["answers"], vqa_accuracy(c["pred"], c["answers"]), c["official_always"])
        for c in vqa_cases()
        if abs(vqa_accuracy(c["pred"], c["answers"]) - c["official_always"]) > TOL
    ]
    assert not wrong, f"{len(wrong)} cases differ, e.g. {wrong[:5]}"


def test_vqa_accuracy_equals_vqaEval_wherever_its_quirk_does_not_apply() -> None:
    """``vqaEval.py`` as it runs: equal on every case with two or more reference answers
    that are not all identical; where they are identical the official tool skips the
    processing (ICD does not, as lmms-eval), and one reference scores 0 there."""
    differ = {"identical": 0, "single": 0}
    for c in vqa_cases():
        ours = vqa_accuracy(c["pred"], c["answers"])
        if len(c["answers"]) == 1:
            assert c["official"] == 0.0
            differ["single"] += ours != 0.0
        elif len({a.replace("\n", " ").replace("\t", " ").strip() for a in c["answers"]}) == 1:
            differ["identical"] += abs(ours - c["official"]) > TOL
        else:
            assert abs(ours - c["official"]) <= TOL, c
    assert differ["identical"] > 0 and differ["single"] > 0  # the goldens do reach the quirks


def test_vqa_accuracy_equals_lmms_eval_vqav2_but_on_doubled_commas() -> None:
    for c in vqa_cases():
        ours = vqa_accuracy(c["pred"], c["answers"])
        if len(c["answers"]) == 1:
            continue
        if any(",," in a for a in [c["pred"], *c["answers"]]):
            continue  # lmms-eval's digit-comma pattern is \d,+\d, the official one \d,\d
        assert abs(ours - c["lmms_vqav2"]) <= TOL, c


@pytest.mark.parametrize(
    "raw, processed",
    [
        ("a.m.", "am"),  # periods removed, not spaced
        ("U.S.", "us"),
        ("U.S.A.", "usa"),
        ("2.5", "2.5"),
        ("dont", "don't"),  # the contractions table
        ("It's", "it's"),  # apostrophes kept
        ("3:30", "3:30"),  # colons kept
        ("none", "0"),
        ("Two dogs", "2 dogs"),
        ("the cat", "cat"),
        ("$5", "$5"),
        ("1,000", "1000"),  # digit-comma-digit: punctuation removed, not spaced
        ("red,white", "red white"),
        ("red, white", "red white"),
        ("t-shirt", "t shirt"),
        ("the", ""),
    ],
)
def test_vqa_normalize_examples(raw: str, processed: str) -> None:
    assert vqa_normalize(raw) == processed


def test_vqa_quirk_choice() -> None:
    # vqaEval.py scores "Yes" 0 against ten "yes" (no processing); ICD, as lmms-eval, 1.0
    assert vqa_accuracy("Yes", ["yes"] * 10) == 1.0
    assert vqa_accuracy("unanswerable", ["unanswerable"] * 7 + ["no"] * 3) == 1.0


def _sets_for(tokenizer: str) -> list[dict[str, Any]]:
    """Every set for the Python tokenizer; every 30th for Java, which is pycocoevalcap's own
    tokenizer (one JVM start per batch, 0.3-1 s; ``ICD_GOLDEN_FULL=1`` runs them all)."""
    sets = caption_sets()
    if tokenizer == "ptb-java" and not os.environ.get("ICD_GOLDEN_FULL"):
        return sets[::30]
    return sets


TOKENIZERS = [
    "ptb-python",
    pytest.param("ptb-java", marks=pytest.mark.skipif(not shutil.which("java"), reason="no java")),
]


@pytest.mark.parametrize("tokenizer", TOKENIZERS)
def test_ptb_tokens_equal_pycocoevalcaps_on_every_golden_caption(tokenizer: str) -> None:
    """Tokenised in the batches ``COCOEvalCap`` makes (a set's references, then its
    candidates): Stanford's lexer reads a caption at the end of its file differently
    (``:)`` there is not a smiley), and so does the Python tokenizer."""
    wrong, total = [], 0
    for s in _sets_for(tokenizer):
        refs = [r for im in s["images"] for r in im["refs"]]
        want = [t for im in s["images"] for t in im["ref_tokens"]]
        preds = [im["pred"] for im in s["images"]]
        want_preds = [im["pred_tokens"] for im in s["images"]]
        got = ptb_tokenize(refs, tokenizer) + ptb_tokenize(preds, tokenizer)  # type: ignore[arg-type]
        total += len(got)
        wrong += [
            (c, g, w)
            for c, g, w in zip(refs + preds, got, want + want_preds, strict=True)
            if g != w
        ]
    assert not wrong, f"{len(wrong)} of {total} captions differ, e.g. {wrong[:5]}"


@pytest.mark.parametrize("tokenizer", TOKENIZERS)
def test_coco_bleu_and_cider_equal_pycocoevalcap_on_every_golden_set(tokenizer: str) -> None:
    wrong = []
    for s in _sets_for(tokenizer):
        preds = [im["pred"] for im in s["images"]]
        refs = [im["refs"] for im in s["images"]]
        got = coco_caption_metrics(preds, refs, tokenizer)  # type: ignore[arg-type]
        assert got["tokenizer"] == tokenizer
        want = [100 * b for b in s["bleu"]] + [s["cider"]]
        have = [got["bleu1"], got["bleu2"], got["bleu3"], got["bleu4"], got["cider"]]
        if any(abs(h - w) > TOL for h, w in zip(have, want, strict=True)):
            wrong.append((preds, have, want))
    assert not wrong, f"{len(wrong)} sets differ, e.g. {wrong[:2]}"


def test_without_java_the_python_tokenizer_is_used_warned_and_recorded(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import icd.method.metrics as metrics

    monkeypatch.delenv(metrics.TOKENIZER_ENV, raising=False)
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    metrics._warn_python_tokenizer.cache_clear()
    assert metrics.caption_tokenizer() == "ptb-python"
    s = caption_sets()[0]
    preds, refs = [im["pred"] for im in s["images"]], [im["refs"] for im in s["images"]]
    with caplog.at_level("WARNING", logger="icd.method.metrics"):
        got = coco_caption_metrics(preds, refs)
    assert got["tokenizer"] == "ptb-python" and "ptb-python" in caplog.text
    assert abs(got["cider"] - s["cider"]) <= TOL
    monkeypatch.setenv(metrics.TOKENIZER_ENV, "ptb-java")
    assert metrics.caption_tokenizer() == "ptb-java"  # forced; fails at use without java
    monkeypatch.setenv(metrics.TOKENIZER_ENV, "nltk")
    with pytest.raises(ValueError, match="ptb-java or ptb-python"):
        metrics.caption_tokenizer()
