"""Evaluation (docs/design.md §2.9): per-sample scores, demonstration accuracy, per-chunk summaries.

- Classification: the prediction is mapped onto the class list exactly as teacher votes are
  (:func:`icd.method.voting.map_to_class`: normalisation, synonyms, fuzzy and containment
  matching, ``fuzzy_threshold``), then scores 1.0 iff it is the true class (or, without a
  class list, iff its normalised form equals the class name or a synonym), else 0.0. So a
  student answer counts right exactly when the same teacher answer would have voted for the
  true class.
- VQA: the standard VQA accuracy. With the usual ten human answers, the official
  evaluation averages ``min(#matches among the other 9 / 3, 1)`` over the ten
  leave-one-annotator-out subsets; for n >= 2 answers we average over the n
  leave-one-out subsets the same way. For a single reference answer it is exact match.
  Both sides are normalised with :func:`normalize_answer` (the standard processing:
  case, punctuation, articles, number words).
- Captioning: per sample, the sentence BLEU of the caption against that sample's reference
  captions (:func:`caption_bleu`: sacrebleu's ``sentence_bleu``, lowercased, its default
  ``13a`` tokenisation and ``exp`` smoothing), divided by 100 so it lives in [0, 1] like the
  other tasks' scores (so running accuracy and the predictions table's ``score`` are a mean
  sentence BLEU). Sentence-level CIDEr does not exist: CIDEr's n-gram weights are document
  frequencies over the evaluated set, and over one image every weight is log(1/1) = 0. The
  corpus-level numbers of a run are :func:`corpus_bleu` (sacrebleu BLEU-4 and BLEU-1, 0–100) and
  :func:`corpus_cider` (pycocoevalcap's CIDEr-D scorer, on the COCO-evaluation scale: papers
  print it ×100), computed once over all of a run's captions.

A run's numbers built from these scores (sums, rates, gains, costs) are defined in
:mod:`icd.method.accounting`.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Mapping, Sequence

from icd.method.voting import map_to_class, normalize_answer


def _accepted_names(
    answers: Iterable[str], synonyms: Mapping[str, Sequence[str]] | None
) -> set[str]:
    names: set[str] = set()
    for a in answers:
        names.add(normalize_answer(a))
        for s in (synonyms or {}).get(a, ()):
            names.add(normalize_answer(s))
    names.discard("")
    return names


def vqa_accuracy(pred: str | None, answers: Sequence[str]) -> float:
    """Standard VQA accuracy of ``pred`` against the human ``answers`` (see module docs)."""
    if pred is None or not answers:
        return 0.0
    p = normalize_answer(pred)
    if not p:
        return 0.0
    matches = [normalize_answer(a) == p for a in answers]
    if len(answers) == 1:
        return float(matches[0])
    total = sum(matches)
    return sum(min((total - m) / 3.0, 1.0) for m in matches) / len(matches)


def caption_bleu(pred: str | None, references: Sequence[str]) -> float:
    """Sentence BLEU (0–100) of one caption against its reference captions: sacrebleu's
    ``sentence_bleu`` with ``lowercase=True`` (13a tokenisation, exp smoothing, effective
    order). 0 for no caption, an empty one, or no references."""
    import sacrebleu

    refs = [r for r in references if r and r.strip()]
    if pred is None or not pred.strip() or not refs:
        return 0.0
    return float(sacrebleu.sentence_bleu(pred, refs, lowercase=True).score)


def corpus_bleu(
    preds: Sequence[str | None], references: Sequence[Sequence[str]], max_order: int = 4
) -> float:
    """Corpus BLEU-``max_order`` (0–100, sacrebleu, lowercased, 13a tokenisation) of
    ``preds[i]`` against ``references[i]``; samples may have different numbers of
    references. A missing caption counts as an empty one. BLEU-4 of captions that never
    reach four words is 0 (no 4-gram matches anywhere in the corpus): BLEU-1 still tells
    how many words were right. Raises ``ValueError`` unless the two align."""
    from sacrebleu.metrics import BLEU

    if len(preds) != len(references):
        raise ValueError("corpus_bleu: preds and references must align")
    if not preds:
        return 0.0
    width = max(len(r) for r in references)
    if width == 0:
        return 0.0
    streams: list[list[str | None]] = [
        [refs[j] if j < len(refs) else None for refs in references] for j in range(width)
    ]
    hyps = [p or "" for p in preds]
    bleu = BLEU(lowercase=True, max_ngram_order=max_order)
    # sacrebleu takes None for a sample with fewer references than the widest one
    return float(bleu.corpus_score(hyps, streams).score)  # type: ignore[arg-type]


def caption_tokens(caption: str) -> str:
    """A caption as CIDEr reads it: unicode NFKC + casefold, every punctuation or symbol
    character a space, whitespace collapsed (what the COCO evaluation's PTB tokenizer does,
    without its Java)."""
    text = unicodedata.normalize("NFKC", caption or "").casefold()
    text = "".join(" " if unicodedata.category(ch)[0] in "PSC" else ch for ch in text)
    return " ".join(text.split())


def corpus_cider(preds: Sequence[str | None], references: Sequence[Sequence[str]]) -> float:
    """Corpus CIDEr-D of ``preds[i]`` against ``references[i]``: pycocoevalcap's ``Cider``
    scorer (n = 1..4, sigma = 6, document frequencies over these references), on its own
    scale (a perfect match of captions of 4+ words scores 10; papers print ×100). Captions
    are tokenised by :func:`caption_tokens`; a missing caption counts as an empty one, and a
    sample without references is left out. 0.0 when no sample is left."""
    from pycocoevalcap.cider.cider import Cider

    if len(preds) != len(references):
        raise ValueError("corpus_cider: preds and references must align")
    gts: dict[int, list[str]] = {}
    res: dict[int, list[str]] = {}
    for i, (p, refs) in enumerate(zip(preds, references, strict=True)):
        tokenised = [caption_tokens(r) for r in refs if r and r.strip()]
        if tokenised:
            gts[i] = tokenised
            res[i] = [caption_tokens(p or "")]
    if not gts:
        return 0.0
    value, _ = Cider().compute_score(gts, res)
    return float(value)


def score(
    pred: str | None,
    answers: Sequence[str],
    task: str,
    synonyms: Mapping[str, Sequence[str]] | None = None,
    class_names: Sequence[str] | None = None,
    fuzzy_threshold: float = 0.85,
) -> float:
    """Score one prediction: classification 1.0/0.0, VQA the standard VQA accuracy,
    captioning the sentence BLEU against the references (``answers``) / 100.

    For classification ``answers`` holds the true class name (any entry counts), and
    ``synonyms`` maps class names to accepted alternatives; with ``class_names`` the
    prediction is first mapped onto the classes as teacher votes are (``fuzzy_threshold``
    as in voting). ``pred=None`` scores 0.
    """
    if task == "vqa":
        return vqa_accuracy(pred, answers)
    if task == "captioning":
        return caption_bleu(pred, answers) / 100.0
    if task != "classification":
        raise ValueError(f"unknown task {task!r}")
    if pred is None:
        return 0.0
    mapped = map_to_class(pred, class_names, synonyms, fuzzy_threshold)
    return float(normalize_answer(mapped) in _accepted_names(answers, synonyms))


def demo_accuracy(
    demo_labels: Sequence[str],
    true_labels: str | Sequence[str],
    synonyms: Mapping[str, Sequence[str]] | None = None,
) -> float | None:
    """Share of the chosen demos whose label is the query's true class (None: no demos).

    ``true_labels`` is the class name (or the list of accepted answers); labels compare by
    normalised match, synonyms included.
    """
    if not demo_labels:
        return None
    truth = [true_labels] if isinstance(true_labels, str) else list(true_labels)
    names = _accepted_names(truth, synonyms)
    return sum(normalize_answer(d) in names for d in demo_labels) / len(demo_labels)
