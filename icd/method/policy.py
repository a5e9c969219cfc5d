"""When to ask the teacher: uncertainty threshold + budget (docs/design.md §2.3).

Budget. The total budget is ``budget_count`` when set; otherwise ``floor(budget * L)`` when
the stream length ``L`` is known; otherwise, after ``seen`` samples, at most
``floor(budget * seen)`` queries may have been made (a running cap). The fraction is taken as
the decimal it is written as (``0.29 * 100`` is 29, not 28.999…). With neither ``budget``
nor ``budget_count`` there is no cap. The cap is checked before every single query, so it is
never exceeded — whatever the uncertainties, however the stream is cut into chunks, and
across a save/restore of :class:`PolicyState`.

Decisions, per sample and in stream order (a chunk is processed sample by sample, so any
chunking gives the same decisions):

1. ``threshold == "never"``: never query.
2. No budget left: do not query.
3. One of the first ``warmup`` samples (W): query unconditionally (counts against the budget).
4. ``"always"``: query. ``"fixed"``: query iff ``u > tau``.
5. ``"adaptive"``: a running quantile. The last ``window`` uncertainties (this one included)
   are kept sorted; with target rate ρ and ``deficit = ρ·seen − queried`` the working rate is
   ``ρ' = clip(ρ + deficit / pace, 0, 1)`` and the threshold is the value with
   ``floor(ρ'·n)`` values of the window above it. Query iff ``u`` is above that threshold, or
   equal to it while at least one whole query behind pace (so a stream of constant
   uncertainties is still sampled at rate ρ). The pacing term pays back the warm-up and any
   drift, so the realised rate tracks ρ all along the stream instead of front-loading it.
   ρ is ``budget_count / L`` when both are known, else ``budget``.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np

from icd.config import PolicyConfig

WINDOW = 1024  # uncertainties remembered for the running quantile
PACE = 256  # samples over which a pacing error is corrected


@dataclass
class PolicyState:
    """Everything the policy remembers between chunks. Plain data; JSON round-trips exactly."""

    seen: int = 0
    queried: int = 0
    history: list[float] = field(default_factory=list)  # last `window` uncertainties, oldest first
    window: int = WINDOW
    pace: int = PACE

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict; :meth:`from_dict` restores an equal state."""
        return {
            "seen": self.seen,
            "queried": self.queried,
            "history": [float(x) for x in self.history],
            "window": self.window,
            "pace": self.pace,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PolicyState:
        """Inverse of :meth:`to_dict`; raises ``ValueError`` on an inconsistent dict."""
        try:
            return cls(
                seen=int(data["seen"]),
                queried=int(data["queried"]),
                history=[float(x) for x in data["history"]],
                window=int(data.get("window", WINDOW)),
                pace=int(data.get("pace", PACE)),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"invalid policy state: {e}") from None

    def __post_init__(self) -> None:
        """``ValueError`` on an inconsistent state (a damaged state file a run resumes
        from, however it is read)."""
        if not (0 <= self.queried <= self.seen) or self.window < 1 or self.pace < 1:
            raise ValueError("invalid policy state: counts or sizes out of range")
        if len(self.history) > self.window or not all(map(math.isfinite, self.history)):
            raise ValueError("invalid policy state: bad uncertainty history")


def _as_fraction(x: float) -> Fraction:
    return Fraction(repr(float(x)))


def total_budget(cfg: PolicyConfig, stream_length: int | None) -> int | None:
    """The fixed total budget, or None when there is none (no budget, or a running cap)."""
    if cfg.budget_count is not None:
        return cfg.budget_count
    if cfg.budget is None or stream_length is None:
        return None
    return math.floor(_as_fraction(cfg.budget) * stream_length)


def budget_cap(cfg: PolicyConfig, seen: int, stream_length: int | None) -> int | None:
    """Most queries allowed in total once ``seen`` samples have been seen (None: unlimited)."""
    total = total_budget(cfg, stream_length)
    if total is not None or cfg.budget is None:
        return total
    return math.floor(_as_fraction(cfg.budget) * seen)


def target_rate(cfg: PolicyConfig, stream_length: int | None) -> float | None:
    """The query rate ρ the adaptive threshold paces to (None when no budget defines one)."""
    if cfg.budget_count is not None and stream_length:
        return min(1.0, cfg.budget_count / stream_length)
    return cfg.budget


def _cap(cfg: PolicyConfig, stream_length: int | None) -> Callable[[int], int | None]:
    """The budget's cap on queries after ``seen`` samples, in integers: a fixed total,
    ``floor(budget * seen)`` (the budget as an exact fraction), or none."""
    total = total_budget(cfg, stream_length)
    if total is not None or cfg.budget is None:
        return lambda seen: total
    frac = _as_fraction(cfg.budget)
    return lambda seen: frac.numerator * seen // frac.denominator


def _paced(
    x: float, ordered: list[float], *, rate: float, seen: int, queried: int, pace: int
) -> bool:
    """The adaptive threshold's decision on uncertainty ``x``: above the quantile of the
    ``ordered`` window that asks at ``rate`` plus the deficit spread over ``pace`` samples
    (at the threshold itself only with a whole sample owed)."""
    deficit = rate * seen - queried
    working = min(1.0, max(0.0, rate + deficit / pace))
    n = len(ordered)
    threshold = ordered[max(0, n - 1 - math.floor(working * n))]
    return x > threshold or (x == threshold and deficit >= 1.0)


def decide_queries(
    uncertainties: np.ndarray,
    state: PolicyState,
    cfg: PolicyConfig,
    stream_length: int | None = None,
) -> tuple[np.ndarray, PolicyState]:
    """Decide, sample by sample in order, which samples the teacher labels.

    Returns a bool mask aligned with ``uncertainties`` and the new state; ``state`` itself
    is not modified, so a retried chunk given the same state decides the same. Raises
    ``ValueError`` for non-finite uncertainties, or for an adaptive threshold without any
    budget to take a rate from.
    """
    u = np.asarray(uncertainties, dtype=np.float64).ravel()
    if not np.all(np.isfinite(u)):
        raise ValueError("uncertainties must be finite")
    mode = cfg.threshold
    rate = target_rate(cfg, stream_length)
    if mode == "adaptive" and rate is None:
        raise ValueError(
            "policy.threshold=adaptive needs a rate to pace to: set policy.budget, "
            "or policy.budget_count with a known stream length"
        )

    cap_after = _cap(cfg, stream_length)
    seen, queried = state.seen, state.queried
    history = deque(state.history, maxlen=state.window)
    ordered = sorted(history)
    out = np.zeros(len(u), dtype=bool)
    for i, x in enumerate(u.tolist()):
        if len(history) == history.maxlen:
            del ordered[bisect.bisect_left(ordered, history[0])]
        history.append(x)
        bisect.insort(ordered, x)
        seen += 1

        cap = cap_after(seen)
        if mode == "never" or (cap is not None and queried >= cap):
            ask = False
        elif seen <= cfg.warmup or mode == "always":
            ask = True
        elif mode == "fixed":
            ask = x > cfg.tau
        else:
            assert rate is not None  # checked above for the adaptive threshold
            ask = _paced(x, ordered, rate=rate, seen=seen, queried=queried, pace=state.pace)
        out[i] = ask
        queried += ask

    new = PolicyState(seen, queried, list(history), state.window, state.pace)
    return out, new
