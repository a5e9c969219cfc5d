"""The length effect on caption uncertainty (documented in icd.method.uncertainty).

The fixture's reference captions run from 2 to 9 words. Give every word of every caption a
token log-prob drawn from one and the same distribution — a model exactly as confident per
word on long captions as on short ones — and compare: the summed NLL (``-seq_logprob``)
grows with the caption's length, ``nll_mean`` and ``entropy_mean`` do not; and best-of-N
by summed log-prob would always pick the shortest caption.
"""

from __future__ import annotations

import numpy as np

from icd.data import shapes
from icd.method.types import Generation
from icd.method.uncertainty import uncertainty


def _fixture_captions(n_images: int = 60) -> list[str]:
    return [c for i in range(n_images) for c in shapes.captions_of(i)]


def _generations(captions: list[str], seed: int = 0) -> list[Generation]:
    rng = np.random.default_rng(seed)
    gens = []
    for c in captions:
        k = len(c.split())  # one token per word: the per-token distribution is what matters
        lps = -rng.exponential(0.4, size=k)
        ent = rng.exponential(0.6, size=k)
        gens.append(Generation(text=c, token_logprobs=lps, token_entropy=ent))
    return gens


def _corr(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.corrcoef(x, y)[0, 1])


def test_summed_nll_grows_with_caption_length_mean_measures_do_not() -> None:
    captions = _fixture_captions()
    lengths = np.array([len(c.split()) for c in captions], dtype=float)
    assert lengths.min() <= 3 and lengths.max() >= 8  # the fixture spans short and long
    gens = _generations(captions)
    summed = np.array([-g.seq_logprob for g in gens])
    nll_mean = uncertainty(gens, "nll_mean")
    entropy_mean = uncertainty(gens, "entropy_mean")
    np.testing.assert_allclose(nll_mean, summed / lengths)

    assert _corr(summed, lengths) > 0.5
    assert abs(_corr(nll_mean, lengths)) < 0.2
    assert abs(_corr(entropy_mean, lengths)) < 0.2
    # A threshold set on the mean NLL of short answers flags most long captions when
    # applied to the summed NLL, and about as many short ones as long ones on the mean.
    short, long = lengths <= 3, lengths >= 7
    tau = float(np.quantile(summed[short], 0.9))
    assert (summed[long] > tau).mean() > 0.6
    tau_mean = float(np.quantile(nll_mean[short], 0.9))
    assert abs((nll_mean[long] > tau_mean).mean() - 0.1) < 0.15


def test_best_of_n_by_summed_logprob_prefers_the_shortest_caption() -> None:
    """Five captions of one image, equally likely per word: the summed log-prob ranks the
    2-word caption first in most trials, the mean log-prob does not favour it."""
    captions = shapes.captions_of(0)
    rng = np.random.default_rng(1)
    by_sum = by_mean = 0
    trials = 200
    shortest = min(range(len(captions)), key=lambda j: len(captions[j].split()))
    for _ in range(trials):
        lps = [-rng.exponential(0.4, size=len(c.split())) for c in captions]
        by_sum += int(np.argmax([x.sum() for x in lps])) == shortest
        by_mean += int(np.argmax([x.mean() for x in lps])) == shortest
    assert by_sum / trials > 0.6
    assert by_mean / trials < 0.4
