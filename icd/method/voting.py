"""Teacher test-time scaling: normalise N answers, map them onto the classes, vote (docs/design.md §2.4);
for captions, pick the consensus caption.

Normalisation (:func:`normalize_answer`), as in the standard VQA evaluation: unicode NFKC +
casefold; apostrophes dropped (``don't`` → ``dont``); a comma between digits dropped
(``1,000`` → ``1000``); a period between digits kept (``2.5``); every other punctuation or
symbol character becomes a space; number words zero…ten become digits; the articles
a/an/the are removed; whitespace is collapsed.

Closed-set mapping (:func:`map_to_class`), first rule that applies:

1. the normalised answer equals a normalised class name;
2. it equals a normalised synonym of exactly one class;
3. fuzzy (only when ``fuzzy_threshold < 1``): the best ``difflib`` ratio against all class
   names and synonyms is ``>= fuzzy_threshold`` and reached by one class only;
4. containment (only when ``fuzzy_threshold < 1``): class names/synonyms occurring as whole
   words inside the answer, keeping only the longest ones (``red circle`` beats ``circle``);
   used when they all belong to one class.

Anything else stays as its own normalised string, and votes as such. Setting
``fuzzy_threshold=1`` switches fuzzy matching off (exact + synonyms only).

Aggregation (:func:`aggregate`): ``majority`` takes the most frequent mapped answer; ties go
to the answer whose voters have the larger summed sequence log-prob, then to the
lexicographically smallest answer, so the result does not depend on the order of the
answers. ``best_of_n`` takes the answer with the highest sequence log-prob (ties: more
votes, then lexicographic). Empty answers never win. ``agreement`` is the winner's vote
share over all N answers; ``accepted`` iff ``agreement >= a_min``. ``consensus`` is the
same rule as ``majority``: the answer most similar to the other answers, which under exact
match of the mapped answers is the plurality vote.

Captions (``task="captioning"``, :func:`aggregate_captions`): free text rarely repeats
exactly, so ``majority``/``consensus`` is minimum-Bayes-risk consensus: the caption with
the highest mean similarity (:func:`caption_similarity`) to the other N−1 captions wins, and
``agreement`` is that mean similarity (in [0, 1]; 1 when every sample says the same), so
``a_min`` filters captions the teacher's samples disagree on. ``best_of_n`` takes the
caption with the highest *mean* token log-prob (a summed log-prob would favour the shortest
caption: every token costs probability), with the same ``agreement``.

The caption similarity is the weighted Jaccard (Ruzicka) similarity of the captions'
unigram + bigram counts after :func:`normalize_answer`: ``sum(min) / sum(max)`` over the
n-grams. Chosen over the two usual candidates because 1 − similarity is a metric (it obeys
the triangle inequality), which gives the consensus a guarantee a vote should have: a
caption that a strict majority of the samples repeat (up to normalisation) always wins (the
proof: against any other caption B at similarity x, the majority caption's lead is at
least (2m − N)(1 − x) ≥ 0, and an exact tie goes to the caption with more copies).
Token-F1 (Dice) breaks the triangle inequality, and sentence BLEU is asymmetric and, on
captions of a few words, mostly smoothing. Bigrams make word order count (``red star`` vs
``star red``). Scores are exact fractions, so ties are exact and the result does not
depend on the order of the samples; ties go to more copies, then the larger summed
log-prob, then the lexicographically smallest normalised caption.
"""

from __future__ import annotations

import difflib
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache

from icd.config import VotingConfig
from icd.method.types import Generation

_NUMBERS = {
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
_APOSTROPHES = "'\u2019\u2018`\u00b4"
_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d)")
_DIGIT_PERIOD = re.compile(r"(?<=\d)\.(?=\d)")
_KEEP_PERIOD = "\x00"


@lru_cache(maxsize=65536)
def normalize_answer(s: str) -> str:
    """Canonical form of an answer for matching and voting (see the module docstring)."""
    s = unicodedata.normalize("NFKC", s or "").casefold()
    for ch in _APOSTROPHES:
        s = s.replace(ch, "")
    s = _DIGIT_COMMA.sub("", s)
    s = _DIGIT_PERIOD.sub(_KEEP_PERIOD, s)
    s = "".join(
        " " if unicodedata.category(ch)[0] in "PSC" and ch != _KEEP_PERIOD else ch for ch in s
    )
    s = s.replace(_KEEP_PERIOD, ".")
    words = [_NUMBERS.get(w, w) for w in s.split() if w not in _ARTICLES]
    return " ".join(words)


@dataclass(frozen=True)
class _ClassIndex:
    """Lookup tables for one class list + synonyms, built once and cached."""

    exact: dict[str, str]  # normalised class name -> class
    synonyms: dict[str, str | None]  # normalised synonym -> class (None: ambiguous)
    names: tuple[tuple[str, str], ...]  # (normalised name or synonym, class), for fuzzy


@lru_cache(maxsize=64)
def _index(
    class_names: tuple[str, ...], synonyms: tuple[tuple[str, tuple[str, ...]], ...]
) -> _ClassIndex:
    exact: dict[str, str] = {}
    for c in class_names:
        exact.setdefault(normalize_answer(c), c)
    syn: dict[str, str | None] = {}
    names = [(k, c) for k, c in exact.items() if k]
    known = set(class_names)
    for c, alts in synonyms:
        if c not in known:
            continue
        for a in alts:
            k = normalize_answer(a)
            if not k or k in exact:
                continue
            syn[k] = c if syn.get(k, c) == c else None
            names.append((k, c))
    return _ClassIndex(exact, syn, tuple(names))


def _freeze(
    synonyms: Mapping[str, Sequence[str]] | None,
) -> tuple[tuple[str, tuple[str, ...]], ...]:
    if not synonyms:
        return ()
    return tuple(sorted((c, tuple(v)) for c, v in synonyms.items()))


def _contains(haystack: str, needle: str) -> bool:
    return f" {needle} " in f" {haystack} "


def map_to_class(
    answer: str,
    class_names: Sequence[str] | None,
    synonyms: Mapping[str, Sequence[str]] | None = None,
    fuzzy_threshold: float = 0.85,
) -> str:
    """The class ``answer`` names, or its normalised form when it names none (or no classes).

    ``synonyms`` maps a class name to alternative names. See the module docstring for the
    rules; they are conservative: an ambiguous fuzzy or containment match maps to nothing.
    """
    norm = normalize_answer(answer)
    if not class_names or not norm:
        return norm
    idx = _index(tuple(class_names), _freeze(synonyms))
    if norm in idx.exact:
        return idx.exact[norm]
    if idx.synonyms.get(norm):
        return idx.synonyms[norm]  # type: ignore[return-value]
    if fuzzy_threshold >= 1.0:
        return norm

    matcher = difflib.SequenceMatcher(autojunk=False)
    matcher.set_seq2(norm)
    best, winners = 0.0, set()
    for name, cls in idx.names:
        matcher.set_seq1(name)
        if matcher.real_quick_ratio() < fuzzy_threshold or matcher.quick_ratio() < fuzzy_threshold:
            continue
        r = matcher.ratio()
        if r > best:
            best, winners = r, {cls}
        elif r == best:
            winners.add(cls)
    if best >= fuzzy_threshold and len(winners) == 1:
        return winners.pop()

    found = [(name, cls) for name, cls in idx.names if _contains(norm, name)]
    longest = [(n, c) for n, c in found if not any(n != m and _contains(m, n) for m, _ in found)]
    if longest and len({c for _, c in longest}) == 1:
        return longest[0][1]
    return norm


@dataclass
class VoteResult:
    """The outcome of one queried sample's teacher answers.

    ``votes`` are the mapped answers in the order given (the pool's ``votes`` column);
    ``label`` is None when there is no usable answer (all empty, or the teacher failed, in
    which case ``error`` says why). ``label`` is the class name when the answer mapped onto
    one, else the normalised answer (a caption: the consensus caption as written); ``answer`` is the winning answer as the teacher wrote it
    (its highest log-prob voter, stripped), e.g. to show open-ended demos in natural spelling.
    """

    label: str | None
    votes: list[str] = field(default_factory=list)
    agreement: float = 0.0
    accepted: bool = False
    error: str | None = None
    answer: str | None = None


def aggregate(
    gens: Sequence[Generation],
    cfg: VotingConfig,
    class_names: Sequence[str] | None = None,
    synonyms: Mapping[str, Sequence[str]] | None = None,
    task: str = "classification",
) -> VoteResult:
    """Vote over one sample's N teacher answers (``cfg.aggregation``: majority = consensus |
    best_of_n). Captions (``task="captioning"``) go to :func:`aggregate_captions`."""
    if task == "captioning":
        return aggregate_captions(gens, cfg)
    votes = [map_to_class(g.text, class_names, synonyms, cfg.fuzzy_threshold) for g in gens]
    counts = Counter(v for v in votes if v)
    if not counts:
        return VoteResult(None, votes, 0.0, False)
    logprob: dict[str, list[float]] = {}
    written: dict[str, list[tuple[float, str]]] = {}
    for v, g in zip(votes, gens, strict=True):
        if v:
            logprob.setdefault(v, []).append(_finite_logprob(g))
            written.setdefault(v, []).append((-_finite_logprob(g), g.text.strip()))

    if cfg.aggregation in ("majority", "consensus"):
        summed = {v: math.fsum(lps) for v, lps in logprob.items()}
        label = min(counts, key=lambda v: (-counts[v], -summed[v], v))
        if cfg.minority:  # the ablation: the least-voted answer wins
            label = min(counts, key=lambda v: (counts[v], summed[v], v))
    elif cfg.aggregation == "best_of_n":
        best = {v: max(lps) for v, lps in logprob.items()}
        label = min(counts, key=lambda v: (-best[v], -counts[v], v))
    else:
        raise ValueError(f"unknown aggregation {cfg.aggregation!r}")
    agreement = counts[label] / len(votes)
    answer = min(written[label])[1]
    return VoteResult(label, votes, agreement, agreement >= cfg.a_min, answer=answer)


def _caption_ngrams(caption: str) -> Counter[tuple[str, ...]]:
    words = normalize_answer(caption).split()
    grams: Counter[tuple[str, ...]] = Counter((w,) for w in words)
    grams.update(zip(words, words[1:], strict=False))
    return grams


def _ruzicka(a: Counter[tuple[str, ...]], b: Counter[tuple[str, ...]]) -> Fraction:
    if not a or not b:
        return Fraction(0)
    keys = a.keys() | b.keys()
    low = sum(min(a[k], b[k]) for k in keys)
    high = sum(max(a[k], b[k]) for k in keys)
    return Fraction(low, high)


def caption_similarity(a: str, b: str) -> float:
    """Similarity of two captions in [0, 1]: the weighted Jaccard of their unigram + bigram
    counts after :func:`normalize_answer` (case, punctuation, articles, number words). 1 for
    captions equal up to normalisation, 0 when they share no word or one is empty;
    symmetric, and 1 − similarity obeys the triangle inequality."""
    return float(_ruzicka(_caption_ngrams(a), _caption_ngrams(b)))


def aggregate_captions(gens: Sequence[Generation], cfg: VotingConfig) -> VoteResult:
    """The consensus caption of one sample's N teacher captions (see the module docstring).

    ``votes`` are the N captions as written (whitespace collapsed; "" for an empty one);
    ``label`` and ``answer`` the winning caption as written (its most likely spelling among
    the samples that normalise alike), None when every caption is empty. ``agreement`` is
    the winner's mean similarity to the other N−1 captions (empty ones count as 0; 1.0 when
    N = 1), whichever ``cfg.aggregation`` picked it; ``accepted`` iff ``agreement >= a_min``.
    """
    votes = [" ".join(g.text.split()) for g in gens]
    keys = [normalize_answer(v) for v in votes]
    grams = [_caption_ngrams(v) for v in votes]
    counts = Counter(k for k in keys if k)
    if not counts:
        return VoteResult(None, votes, 0.0, False)
    first = {k: keys.index(k) for k in counts}  # one representative per normalised caption
    others = len(votes) - 1
    support: dict[str, Fraction] = {}
    for k, i in first.items():
        total = sum(
            (_ruzicka(grams[i], grams[j]) for j in range(len(votes)) if j != i), Fraction(0)
        )
        support[k] = total / others if others else Fraction(1)
    summed: dict[str, float] = {}
    mean_lp: dict[str, float] = {}
    written: dict[str, list[tuple[float, str]]] = {}
    for k, v, g in zip(keys, votes, gens, strict=True):
        if k:
            written.setdefault(k, []).append((-_finite_logprob(g), v))
            mean_lp[k] = max(mean_lp.get(k, -math.inf), _mean_logprob(g))
    for k, entries in written.items():
        summed[k] = math.fsum(-lp for lp, _ in entries)

    if cfg.aggregation in ("majority", "consensus"):
        label = min(counts, key=lambda k: (-support[k], -counts[k], -summed[k], k))
    elif cfg.aggregation == "best_of_n":
        label = min(counts, key=lambda k: (-mean_lp[k], -support[k], -counts[k], k))
    else:
        raise ValueError(f"unknown aggregation {cfg.aggregation!r}")
    agreement = float(support[label])
    caption = min(written[label])[1]
    return VoteResult(caption, votes, agreement, agreement >= cfg.a_min, answer=caption)


def _mean_logprob(g: Generation) -> float:
    lps = [float(x) for x in g.token_logprobs]
    if not lps:
        return -1e30
    mean = math.fsum(lps) / len(lps)
    return mean if math.isfinite(mean) else -1e30


def _finite_logprob(g: Generation) -> float:
    lp = g.seq_logprob
    return lp if math.isfinite(lp) else -1e30
