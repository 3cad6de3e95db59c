"""95% intervals for the quality tables, and the verdict a goal gets from one.

- PPL Δ of a variant against the full cache: a paired percentile bootstrap over windows. Each window scores the same
  number of tokens, so a resample's PPL ratio is ``exp(mean over its windows of (NLL_variant - NLL_full))``; the same
  draw of windows serves both (paired), and the draw is seeded, so a table renders the same every time.
- Needle accuracy: the Wilson score interval of ``k`` hits in ``n`` needles.
- A ``<= limit`` goal is **met** only when the whole interval lies at or under the limit, **missed** when the whole
  interval lies above it, and **not resolved** otherwise (``>= limit`` goals the other way round).

numpy only (a runtime dependency); the tests check both intervals against scipy's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np

LEVEL = 0.95
RESAMPLES = 10_000
Z = NormalDist().inv_cdf(0.5 + LEVEL / 2)  # 1.96


def ppl_delta_bootstrap(nll: Sequence[float], nll_base: Sequence[float], seed: int = 0,
                        resamples: int = RESAMPLES) -> np.ndarray:
    """``resamples`` bootstrap draws of the PPL Δ in % (``100 (ppl / ppl_base - 1)``), from each window's mean NLL of
    the variant and of the full cache, paired by window (same windows, same order)."""
    if len(nll) != len(nll_base) or len(nll) < 2:
        raise ValueError(f"a paired interval needs the same >= 2 windows on both sides, got {len(nll)} and "
                         f"{len(nll_base)}")
    d = np.asarray(nll, float) - np.asarray(nll_base, float)
    idx = np.random.default_rng(seed).integers(0, len(d), (resamples, len(d)))
    return 100 * np.expm1(d[idx].mean(1))


def ppl_delta_interval(nll: Sequence[float], nll_base: Sequence[float], seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the paired PPL Δ in % (:func:`ppl_delta_bootstrap`)."""
    lo, hi = np.percentile(ppl_delta_bootstrap(nll, nll_base, seed), [50 * (1 - LEVEL), 50 * (1 + LEVEL)])
    return float(lo), float(hi)


def ppl_delta_noise(nll: Sequence[float], nll_base: Sequence[float], seed: int = 0) -> float:
    """The paired PPL Δ's noise: its bootstrap standard error, in % points."""
    return float(ppl_delta_bootstrap(nll, nll_base, seed).std(ddof=1))


def wilson(k: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion ``k / n``."""
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    p, z2 = k / n, Z * Z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def at_most(lo: float, hi: float, limit: float) -> str:
    """Verdict of a ``value <= limit`` goal from the value's interval."""
    return "met" if hi <= limit else "missed" if lo > limit else "not resolved"


def at_least(lo: float, hi: float, limit: float) -> str:
    """Verdict of a ``value >= limit`` goal from the value's interval."""
    return "met" if lo >= limit else "missed" if hi < limit else "not resolved"


def gap_kept(ppl: float, ppl_full: float, ppl_floor: float) -> float | None:
    """Fraction of the full-vs-floor gap a variant keeps: 1 = as good as the full cache, 0 = as bad as keeping only
    the floor's last tokens (below 0: worse than that). None when the floor is not worse than the full cache."""
    gap = ppl_floor - ppl_full
    return (ppl_floor - ppl) / gap if gap > 0 else None
