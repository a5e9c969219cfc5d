"""Evaluation (docs/design.md §2.9): per-sample scores, demonstration accuracy, corpus caption
metrics. Each number follows the official evaluation its field reports.

- Classification: the prediction is mapped onto the class list exactly as teacher votes are
  (:func:`icd.method.voting.map_to_class`: normalisation, synonyms, fuzzy and containment
  matching, ``fuzzy_threshold``), then scores 1.0 iff it is the true class (or, without a
  class list, iff its normalised form equals the class name or a synonym), else 0.0. So a
  student answer counts right exactly when the same teacher answer would have voted for the
  true class.
- VQA (:func:`vqa_accuracy`): the official VQA accuracy — the VQA challenge's ``vqaEval.py``
  (GT-Vision-Lab/VQA), answer processing included (:func:`vqa_normalize`), and
  ``min(#matches among the other answers / 3, 1)`` averaged over the leave-one-annotator-out
  subsets. Where the official tool has a quirk, ICD follows lmms-eval's VQAv2 scoring: the
  official tool processes answers only when the reference answers are not all identical
  (so ``"Yes"`` scores 0 against ten ``"yes"``), lmms-eval always processes both sides, and
  so does ICD. Voting keeps its own, looser normaliser (:mod:`icd.method.voting`).
- Captioning: the COCO caption evaluation (pycocoevalcap's ``COCOEvalCap``): captions are
  tokenised by the Stanford PTB tokenizer with its punctuation tokens removed
  (:func:`ptb_tokenize`), then scored by pycocoevalcap's own ``Bleu(4)`` (BLEU-1..4,
  reported ×100) and ``Cider`` (CIDEr-D, on its own scale: papers print it ×100) over all
  of a run's captions (:func:`coco_caption_metrics`). The per-sample ``score`` (running
  accuracy, the predictions table) is a sentence-level *proxy*, :func:`caption_bleu`: CIDEr
  has no per-sample form (its n-gram weights are document frequencies over the evaluated
  set), and COCO BLEU is a corpus statistic.

A run's numbers built from these scores (sums, rates, gains, costs) are defined in
:mod:`icd.method.accounting`.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from icd.method.voting import map_to_class, normalize_answer

log = logging.getLogger(__name__)


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


# ---------------------------------------------------------------------------------- VQA
# The official answer processing, table for table (vqaEval.py; lmms-eval's
# EvalAIAnswerProcessor carries the same tables).

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}  # fmt: skip
# "none" -> "0" as well as the number words (the official manualMap)
_MANUAL_MAP = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_VQA_ARTICLES = frozenset({"a", "an", "the"})
# The official pattern, its stray "<=" included: it removes every period not followed by a
# digit ("a.m." -> "am", "u.s." -> "us", "2.5" kept).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
_VQA_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
              "@", "`", ",", "?", "!")  # fmt: skip


def _process_punctuation(text: str) -> str:
    """vqaEval's ``processPunctuation``: each of its 21 punctuation marks is deleted where it
    touches a space (or anywhere, once the answer has a digit-comma-digit), else replaced by a
    space; apostrophes, colons, ``$``, ``%`` and the rest are kept; then periods not followed
    by a digit are deleted — at most 32 of them, since the official call passes
    ``re.UNICODE`` (= 32) as ``sub``'s count."""
    out = text
    strip_all = _COMMA_STRIP.search(text) is not None
    for p in _VQA_PUNCT:
        if strip_all or (p + " " in text or " " + p in text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=re.UNICODE)


def _process_digit_article(text: str) -> str:
    """vqaEval's ``processDigitArticle``: lowercase, split on whitespace, number words and
    ``none`` to digits, drop articles, expand the contractions table."""
    words = [_MANUAL_MAP.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _VQA_ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


@functools.lru_cache(maxsize=65536)
def vqa_normalize(answer: str) -> str:
    """An answer as the official VQA evaluation compares it: newlines and tabs to spaces,
    stripped, then ``processPunctuation`` and ``processDigitArticle`` of ``vqaEval.py``."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def vqa_accuracy(pred: str | None, answers: Sequence[str]) -> float:
    """Official VQA accuracy of ``pred`` against the human ``answers``.

    Both sides are processed by :func:`vqa_normalize` — always, as lmms-eval's VQAv2 scoring
    does; the original ``vqaEval.py`` skips the processing when all reference answers are
    identical, which scores a correct ``"Yes"`` 0 against ten ``"yes"``. Then the mean, over
    the n leave-one-annotator-out subsets of the n answers (n = 10 in VQAv2, OK-VQA,
    TextVQA and VizWiz; fewer works the same way), of ``min(#answers in the subset equal to
    the prediction / 3, 1)``. An empty prediction is an answer like any other (it matches
    references that process to ""); VizWiz's "unanswerable" is an ordinary answer.

    Where ICD leaves the official tool, on purpose:

    - a single reference answer is exact match of the processed answers (the official
      formula scores every prediction 0 there: its one leave-one-out subset is empty);
    - ``None`` (no answer at all) and no references score 0;
    - lmms-eval's own copy of the processing tests for a digit-comma-digit with
      ``\\d,+\\d``, the official one with ``\\d,\\d``; ICD follows the official one (they
      differ only on answers such as ``"1,,5"``).

    Python 3 semantics throughout (``\\d`` and ``str.lower`` are Unicode-aware), as in
    lmms-eval and any Python 3 run of the official tool.
    """
    if pred is None or not answers:
        return 0.0
    p = vqa_normalize(pred)
    refs = [vqa_normalize(a or "") for a in answers]  # a missing answer is an empty one
    if len(refs) == 1:
        return float(refs[0] == p)
    matches = [r == p for r in refs]
    total = sum(matches)
    acc = [min(1.0, float(total - m) / 3) for m in matches]
    return float(sum(acc)) / len(acc)


# ----------------------------------------------------------------------------- captions

CaptionTokenizer = Literal["ptb-java", "ptb-python"]

# pycocoevalcap's PTBTokenizer: the tokens it removes after Stanford's tokenizer (as it
# lists them: the lowercased brackets "-lrb-" etc. survive, as in every COCO evaluation)
PTB_PUNCTUATIONS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-",
     "--", "...", ";"]
)  # fmt: skip
# Stanford's tokenizer starts a new line at each of these; pycocoevalcap replaces only "\n"
# (so one of the others would shift every later caption onto the wrong image)
_LINE_BREAKS = re.compile("[\n\r\x0b\x0c\u2028\u2029]")
TOKENIZER_ENV = "ICD_CAPTION_TOKENIZER"


def _ptb_jar() -> Path | None:
    try:
        from pycocoevalcap.tokenizer import ptbtokenizer
    except ImportError:
        return None
    jar = Path(ptbtokenizer.__file__).resolve().parent / "stanford-corenlp-3.4.1.jar"
    return jar if jar.is_file() else None


def caption_tokenizer() -> CaptionTokenizer:
    """The PTB tokenizer this machine runs: ``ptb-java`` (the COCO evaluation's own: Stanford
    CoreNLP 3.4.1's PTBTokenizer, through ``java``, from pycocoevalcap) when ``java`` is on
    PATH, else ``ptb-python`` (:mod:`icd.method.ptb`: the lexer's rules that captions meet,
    in Python; the same tokens on every golden caption, an approximation beyond them, and
    warned as such). ``ICD_CAPTION_TOKENIZER=ptb-java|ptb-python`` forces one."""
    forced = os.environ.get(TOKENIZER_ENV, "").strip()
    if forced in ("ptb-java", "ptb-python"):
        return forced  # type: ignore[return-value]
    if forced:
        raise ValueError(f"{TOKENIZER_ENV}={forced!r}: expected ptb-java or ptb-python")
    return "ptb-java" if shutil.which("java") and _ptb_jar() else "ptb-python"


@functools.cache
def _warn_python_tokenizer() -> None:
    log.warning(
        "caption metrics: tokenising with the Python PTB tokenizer (no java on PATH): equal "
        "to the COCO evaluation's Java tokenizer on ICD's golden captions, an approximation "
        "of it elsewhere; the run records caption_tokenizer=ptb-python"
    )


def _ptb_java(captions: Sequence[str]) -> list[str]:
    jar = _ptb_jar()
    if jar is None or not shutil.which("java"):
        raise RuntimeError("ptb-java needs java on PATH and pycocoevalcap's jar")
    with tempfile.TemporaryDirectory(prefix="icd-ptb-") as tmp:
        path = Path(tmp) / "captions.txt"
        path.write_bytes("\n".join(captions).encode())
        out = subprocess.run(
            ["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer",
             "-preserveLines", "-lowerCase", str(path)],
            capture_output=True, check=True,
        )  # fmt: skip
    lines = out.stdout.decode().split("\n")
    if len(lines) < len(captions):
        lines += [""] * (len(captions) - len(lines))
    return [
        " ".join(w for w in line.rstrip().split(" ") if w not in PTB_PUNCTUATIONS)
        for line in lines[: len(captions)]
    ]


def ptb_tokenize(
    captions: Sequence[str | None], tokenizer: CaptionTokenizer | None = None
) -> list[str]:
    """Captions as the COCO caption evaluation scores them: pycocoevalcap's ``PTBTokenizer``
    (Stanford PTBTokenizer ``-preserveLines -lowerCase``, then its punctuation tokens
    removed), tokens joined by single spaces. ``tokenizer`` defaults to
    :func:`caption_tokenizer`. ``None`` is an empty caption; line breaks become spaces."""
    texts = [_LINE_BREAKS.sub(" ", c or "") for c in captions]
    if not texts:
        return []
    if (tokenizer or caption_tokenizer()) == "ptb-java":
        return _ptb_java(texts)
    from icd.method.ptb import coco_tokenize

    return [coco_tokenize(t, last=i == len(texts) - 1) for i, t in enumerate(texts)]


def coco_caption_metrics(
    preds: Sequence[str | None],
    references: Sequence[Sequence[str]],
    tokenizer: CaptionTokenizer | None = None,
) -> dict[str, Any]:
    """The COCO caption evaluation of ``preds[i]`` against ``references[i]``, as
    pycocoevalcap's ``COCOEvalCap.evaluate`` runs it: :func:`ptb_tokenize` every caption,
    then its ``Bleu(4)`` (``bleu1`` … ``bleu4``, ×100 as papers print them) and ``Cider``
    (``cider``: CIDEr-D, n = 1..4, sigma = 6, document frequencies over these references, on
    pycocoevalcap's scale: a perfect set of 4+-word captions scores 10, papers print ×100).
    ``tokenizer`` names the tokenizer used (recorded with a run's numbers). A missing
    caption counts as an empty one; a sample without references (or with only empty ones)
    is left out; no sample left: every number None. Raises ``ValueError`` unless the two
    align."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if len(preds) != len(references):
        raise ValueError("coco_caption_metrics: preds and references must align")
    tok = tokenizer or caption_tokenizer()
    if tok == "ptb-python":
        _warn_python_tokenizer()
    kept = [
        (p, [r for r in refs if r and r.strip()]) for p, refs in zip(preds, references, strict=True)
    ]
    kept = [(p, refs) for p, refs in kept if refs]
    out: dict[str, Any] = dict.fromkeys(("bleu1", "bleu2", "bleu3", "bleu4", "cider"))
    out["tokenizer"] = tok
    if not kept:
        return out
    # two batches, references then candidates, in image order: as COCOEvalCap tokenises
    # (Stanford's lexer reads the last caption of a batch differently, e.g. ":)")
    ref_tokens = ptb_tokenize([r for _, refs in kept for r in refs], tok)
    pred_tokens = ptb_tokenize([p for p, _ in kept], tok)
    res = {i: [t] for i, t in enumerate(pred_tokens)}
    gts: dict[int, list[str]] = {}
    at = 0
    for i, (_, refs) in enumerate(kept):
        gts[i] = ref_tokens[at : at + len(refs)]
        at += len(refs)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    for n, value in enumerate(bleu, start=1):
        out[f"bleu{n}"] = 100.0 * float(value)
    out["cider"] = float(cider)
    return out


def corpus_bleu(
    preds: Sequence[str | None],
    references: Sequence[Sequence[str]],
    max_order: int = 4,
    tokenizer: CaptionTokenizer | None = None,
) -> float:
    """COCO BLEU-``max_order`` (0–100) of the captions: :func:`coco_caption_metrics`'
    ``bleu{max_order}`` (0.0 when no sample has references)."""
    if not 1 <= max_order <= 4:
        raise ValueError("corpus_bleu: max_order is 1..4")
    value = coco_caption_metrics(preds, references, tokenizer)[f"bleu{max_order}"]
    return 0.0 if value is None else float(value)


def corpus_cider(
    preds: Sequence[str | None],
    references: Sequence[Sequence[str]],
    tokenizer: CaptionTokenizer | None = None,
) -> float:
    """COCO CIDEr-D of the captions: :func:`coco_caption_metrics`' ``cider`` (0.0 when no
    sample has references)."""
    value = coco_caption_metrics(preds, references, tokenizer)["cider"]
    return 0.0 if value is None else float(value)


def caption_tokens(caption: str | None) -> str:
    """One caption as the COCO evaluation reads it, by the Python PTB tokenizer (no Java):
    lowercased PTB tokens, punctuation tokens removed, joined by spaces."""
    return ptb_tokenize([caption], "ptb-python")[0]


def caption_bleu(pred: str | None, references: Sequence[str]) -> float:
    """The per-sample caption score, a sentence-level *proxy* (0–100) for the corpus
    numbers: sacrebleu's ``sentence_bleu`` (BLEU-4, exp smoothing, effective order) of the
    caption against its references, all tokenised as the COCO evaluation tokenises them
    (:func:`caption_tokens`; sacrebleu's own tokenisation off). 0 for no caption, one with
    no tokens, or no references."""
    import sacrebleu

    refs = [t for t in (caption_tokens(r) for r in references if r) if t]
    hyp = caption_tokens(pred) if pred else ""
    if not hyp or not refs:
        return 0.0
    return float(sacrebleu.sentence_bleu(hyp, refs, tokenize="none").score)


def score(
    pred: str | None,
    answers: Sequence[str],
    task: str,
    synonyms: Mapping[str, Sequence[str]] | None = None,
    class_names: Sequence[str] | None = None,
    fuzzy_threshold: float = 0.85,
) -> float:
    """Score one prediction: classification 1.0/0.0, VQA the official VQA accuracy
    (:func:`vqa_accuracy`), captioning the sentence-BLEU proxy against the references
    (``answers``) / 100 (:func:`caption_bleu`).

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
