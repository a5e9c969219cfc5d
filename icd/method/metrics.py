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

Chunk metrics are sums and counts (so chunks merge exactly with :func:`merge_metrics`)
plus the derived rates.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from icd.method.voting import map_to_class, normalize_answer

_SOURCES = ("teacher", "student_icl", "pool_vote", "student_zs", "teacher_zs", "student_fallback")


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
    return float(bleu.corpus_score(hyps, streams).score)


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


def _mean(total: float, n: int) -> float | None:
    return total / n if n else None


def chunk_metrics(
    rows: Sequence[Mapping[str, Any]],
    task: str,
    n_votes: int,
    pool_size: int,
    synonyms: Mapping[str, Sequence[str]] | None = None,
    class_names: Sequence[str] | None = None,
    fuzzy_threshold: float = 0.85,
) -> dict[str, Any]:
    """Summary numbers for one chunk's prediction rows (the predictions-table fields).

    Zero-shot and ICL answers are scored by :func:`score` (mapped onto ``class_names`` as
    teacher votes are).

    Reads per row: ``skip_reason``, ``answers``, ``score`` (None: unscored), ``zs_answer``,
    ``icl_answer``, ``queried``, ``accepted``, ``agreement``, ``teacher_error``,
    ``demo_accuracy``, ``final_source``. Teacher calls count every one of the ``n_votes``
    answers of each queried sample (failed ones too) plus one per teacher zero-shot answer.
    Returns counts and sums (mergeable) and the derived rates (None when undefined).
    """
    m: dict[str, Any] = {
        "samples": len(rows),
        "skipped": 0,
        "scored": 0,
        "score_sum": 0.0,
        "zs_scored": 0,
        "zs_score_sum": 0.0,
        "forward_score_sum": 0.0,
        "icl_scored": 0,
        "icl_score_sum": 0.0,
        "queried": 0,
        "accepted": 0,
        "teacher_calls": 0,
        "teacher_errors": 0,
        "agreement_n": 0,
        "agreement_sum": 0.0,
        "agreement_min": None,
        "demo_n": 0,
        "demo_sum": 0.0,
        "pool_size": pool_size,
    }
    m.update({f"source_{s}": 0 for s in _SOURCES})
    for r in rows:
        if r.get("skip_reason"):
            m["skipped"] += 1
            continue
        answers = r.get("answers") or []
        if r.get("score") is not None:
            m["scored"] += 1
            m["score_sum"] += float(r["score"])
        if r.get("zs_answer") is not None:
            m["zs_scored"] += 1
            zs = score(r["zs_answer"], answers, task, synonyms, class_names, fuzzy_threshold)
            m["zs_score_sum"] += zs
            # what forwarding this run's teacher labels (no ICL) scores on the same samples
            label = r.get("teacher_label") if r.get("queried") else None
            m["forward_score_sum"] += (
                zs
                if label is None
                else score(label, answers, task, synonyms, class_names, fuzzy_threshold)
            )
        if r.get("icl_answer") is not None:
            m["icl_scored"] += 1
            m["icl_score_sum"] += score(
                r["icl_answer"], answers, task, synonyms, class_names, fuzzy_threshold
            )
        if r.get("queried"):
            m["queried"] += 1
            m["teacher_calls"] += n_votes
            m["accepted"] += bool(r.get("accepted"))
            m["teacher_errors"] += r.get("teacher_error") is not None
            if r.get("agreement") is not None:
                a = float(r["agreement"])
                m["agreement_n"] += 1
                m["agreement_sum"] += a
                m["agreement_min"] = a if m["agreement_min"] is None else min(m["agreement_min"], a)
        source = r.get("final_source")
        if source == "teacher_zs":
            m["teacher_calls"] += 1
        if source in _SOURCES:
            m[f"source_{source}"] += 1
        if r.get("demo_accuracy") is not None:
            m["demo_n"] += 1
            m["demo_sum"] += float(r["demo_accuracy"])
    return _derive(m)


def _derive(m: dict[str, Any]) -> dict[str, Any]:
    valid = m["samples"] - m["skipped"]
    m["accuracy"] = _mean(m["score_sum"], m["scored"])
    m["zs_accuracy"] = _mean(m["zs_score_sum"], m["zs_scored"])
    m["forward_accuracy"] = _mean(m["forward_score_sum"], m["zs_scored"])
    m["icl_accuracy"] = _mean(m["icl_score_sum"], m["icl_scored"])
    m["annotation_rate"] = _mean(m["queried"], valid)
    m["acceptance_rate"] = _mean(m["accepted"], m["queried"])
    m["mean_agreement"] = _mean(m["agreement_sum"], m["agreement_n"])
    m["demo_accuracy"] = _mean(m["demo_sum"], m["demo_n"])
    return m


_ADDITIVE = [
    "samples",
    "skipped",
    "scored",
    "score_sum",
    "zs_scored",
    "zs_score_sum",
    "forward_score_sum",
    "icl_scored",
    "icl_score_sum",
    "queried",
    "accepted",
    "teacher_calls",
    "teacher_errors",
    "agreement_n",
    "agreement_sum",
    "demo_n",
    "demo_sum",
] + [f"source_{s}" for s in _SOURCES]


def merge_metrics(running: Mapping[str, Any] | None, chunk: Mapping[str, Any]) -> dict[str, Any]:
    """The running summary after ``chunk``: sums add up, ``pool_size`` is the latest,
    ``agreement_min`` the minimum, rates recomputed. ``running=None`` starts a run."""
    if running is None:
        return _derive(dict(chunk))
    m = {key: running[key] + chunk[key] for key in _ADDITIVE}
    m["pool_size"] = chunk["pool_size"]
    mins = [x for x in (running.get("agreement_min"), chunk.get("agreement_min")) if x is not None]
    m["agreement_min"] = min(mins) if mins else None
    return _derive(m)
