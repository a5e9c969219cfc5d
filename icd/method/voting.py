"""Teacher test-time scaling: normalise N answers, map them onto the classes, vote (DESIGN §2.4).

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
share over all N answers; ``accepted`` iff ``agreement >= a_min``.
"""

from __future__ import annotations

import difflib
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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
    one, else the normalised answer; ``answer`` is the winning answer as the teacher wrote it
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
) -> VoteResult:
    """Vote over one sample's N teacher answers (``cfg.aggregation``: majority | best_of_n)."""
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

    if cfg.aggregation == "majority":
        summed = {v: math.fsum(lps) for v, lps in logprob.items()}
        label = min(counts, key=lambda v: (-counts[v], -summed[v], v))
    elif cfg.aggregation == "best_of_n":
        best = {v: max(lps) for v, lps in logprob.items()}
        label = min(counts, key=lambda v: (-best[v], -counts[v], v))
    else:
        raise ValueError(f"unknown aggregation {cfg.aggregation!r}")
    agreement = counts[label] / len(votes)
    answer = min(written[label])[1]
    return VoteResult(label, votes, agreement, agreement >= cfg.a_min, answer=answer)


def _finite_logprob(g: Generation) -> float:
    lp = g.seq_logprob
    return lp if math.isfinite(lp) else -1e30
