"""Student uncertainty from the answer tokens' distributions (docs/design.md §2.2).

Every measure maps a batch of :class:`Generation` records to one finite float per answer;
larger means less certain. The per-token statistics are padded into ``[B, T]`` arrays with
a mask, so a batch is computed with a handful of numpy operations.

Measures:

- ``entropy_mean``: mean token entropy (nats) over the answer tokens — the paper's measure
  and the default. Length-averaged, so a long caption and a one-word label are on the same
  scale per token, not per answer.
- ``nll_mean``: mean negative log-probability of the chosen answer tokens.
- ``entropy_first``: entropy of the first decoding step's distribution.
- ``margin``: ``1 - (p1 - p2)`` from the first step's two largest probabilities; 0 when the
  top token has all the mass, 1 when the two best tokens tie.

**Length.** On captions the measures' relation to answer length matters (the paper's
reviewers flag it). The measures here are all per token or first-token: ``entropy_mean``
and ``nll_mean`` average over the answer's tokens, so a longer caption is not more
uncertain for being longer; ``entropy_first`` and ``margin`` read only the first step
(for a caption that is often an article, so they say little). A *summed* measure — the
sequence NLL, ``-Generation.seq_logprob``, or summed entropy — grows with every token: on
captions it ranks long answers as uncertain whatever the model's confidence per word, and a
threshold tuned on one-word labels would query nearly every caption. The
other side of the same effect: best-of-N by summed log-prob prefers the shortest caption,
which is why caption voting ranks by the mean token log-prob
(:func:`icd.method.voting.aggregate_captions`). Mean-type measures are not length-free
either — the first tokens of an answer are usually the uncertain ones, so averaging over
more (predictable) words lowers them somewhat — so compare thresholds within a task, not
across tasks. ``tests/method/test_caption_length.py`` shows both on the fixture's captions.

An empty answer (no text: the model ended at once, or wrote only whitespace) is maximally
uncertain under every measure: :data:`EMPTY_UNCERTAINTY` (``MAX_STAT``, the bound of any
answer's value; 1.0 for ``margin``), so the query policy sends it to the teacher rather
than trusting a model that said nothing. (Its token statistics would say otherwise: an
immediate end-of-sequence has no answer tokens, a confident one a near-zero entropy.)
Non-finite token statistics (a ``-inf`` log-prob from
an underflowed probability, a NaN) are clipped to ``±MAX_STAT`` / set to 0 so the result is
always finite.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from icd.method.types import Generation

MEASURES = ("entropy_mean", "nll_mean", "entropy_first", "margin")
MAX_STAT = 1e4  # bound for a single token's entropy or negative log-prob
EMPTY_UNCERTAINTY = {"entropy_mean": MAX_STAT, "nll_mean": MAX_STAT, "entropy_first": MAX_STAT}
EMPTY_UNCERTAINTY["margin"] = 1.0
# Not a measure of uncertainty: the baseline the gate is compared with ("is the gate better
# than querying at random?"). Uniform in [0, 1), a digest of the answer and its token
# log-probs, so it is the same on a rerun or resume and unrelated to how unsure the student is.
RANDOM = "random"


def pad(arrays: Sequence[np.ndarray], fill: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Stack 1-d arrays of different lengths into ``values [B, T]`` and ``mask [B, T]``.

    ``mask[b, t]`` is True where ``t < len(arrays[b])``; padded cells hold ``fill``.
    ``T`` is the longest length (0 when every array is empty).
    """
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
    width = int(lengths.max()) if len(lengths) else 0
    mask = np.arange(width)[None, :] < lengths[:, None]
    values = np.full((len(arrays), width), fill, dtype=np.float64)
    if width:
        # Boolean assignment fills row-major, i.e. in the order of the concatenation.
        values[mask] = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays])
    return values, mask


def _finite(x: np.ndarray) -> np.ndarray:
    return np.clip(
        np.nan_to_num(x, nan=0.0, posinf=MAX_STAT, neginf=-MAX_STAT), -MAX_STAT, MAX_STAT
    )


def _masked_mean(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    counts = mask.sum(axis=1)
    total = np.where(mask, values, 0.0).sum(axis=1)
    return np.where(counts > 0, total / np.maximum(counts, 1), 0.0)


def uncertainty(gens: Sequence[Generation], measure: str = "entropy_mean") -> np.ndarray:
    """One uncertainty per generation (float64 ``[len(gens)]``, finite, >= 0).

    ``measure`` is one of :data:`MEASURES`; anything else raises ``ValueError``.
    """
    if measure == RANDOM:
        return np.array([_digest_uniform(g) for g in gens], dtype=np.float64)
    if measure not in MEASURES:
        known = ", ".join([*MEASURES, RANDOM])
        raise ValueError(f"unknown uncertainty measure {measure!r} (known: {known})")
    if len(gens) == 0:
        return np.zeros(0, dtype=np.float64)
    empty = np.fromiter((not g.text.strip() for g in gens), dtype=bool, count=len(gens))
    return np.where(empty, EMPTY_UNCERTAINTY[measure], _measure(gens, measure))


def _digest_uniform(gen: Generation) -> float:
    import hashlib

    h = hashlib.blake2b(gen.text.encode(), digest_size=8)
    h.update(np.ascontiguousarray(gen.token_logprobs, dtype=np.float64).tobytes())
    return int.from_bytes(h.digest(), "big") / 2.0**64


def _measure(gens: Sequence[Generation], measure: str) -> np.ndarray:
    if measure == "margin":
        top2 = np.array([g.first_top2 for g in gens], dtype=np.float64).reshape(len(gens), 2)
        top2 = np.clip(np.nan_to_num(top2, nan=0.0), 0.0, 1.0)
        return np.clip(1.0 - (top2[:, 0] - top2[:, 1]), 0.0, 1.0)

    if measure == "nll_mean":
        values, mask = pad([g.token_logprobs for g in gens])
        return np.maximum(_masked_mean(-_finite(values), mask), 0.0)

    values, mask = pad([g.token_entropy for g in gens])
    values = np.maximum(_finite(values), 0.0)
    if measure == "entropy_first":
        return values[:, 0] * mask[:, 0] if values.shape[1] else np.zeros(len(gens))
    return _masked_mean(values, mask)
