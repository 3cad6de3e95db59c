"""Small statistics over repeated runs (one value per seed).

* Missing values (``None``, NaN, ±inf: a failed run has no metric) are ignored, so results are NaN-free whenever a
  value remains; with none left, functions return ``(nan, nan)``, which :func:`fmt_pm` renders as ``NA``.
* ``std`` is the sample standard deviation (ddof=1), ``0.0`` for a single value.
* :func:`delta` and :func:`speedup` compare two methods *per seed* (same seed -> same prompt), then aggregate the
  per-seed differences / ratios. Inputs: ``{seed: value}`` or ``(seed, value)`` pairs; only the seeds usable on
  *both* sides count (an empty intersection gives ``(nan, nan)`` -> ``NA``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

Number = float | int
Paired = Mapping[Any, Number | None] | Iterable[tuple[Any, Number | None]]
NA = "NA"


def _usable(v: Any) -> bool:
    if v is None or isinstance(v, bool):
        return False
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def clean(xs: Iterable[Number | None]) -> list[float]:
    """Drop None/NaN/inf (failed or missing runs)."""
    return [float(x) for x in xs if _usable(x)]


def mean_std(xs: Iterable[Number | None]) -> tuple[float, float]:
    """``(mean, sample std)`` of the usable values; std is 0.0 for one value; ``(nan, nan)`` for none."""
    v = clean(xs)
    n = len(v)
    if n == 0:
        return math.nan, math.nan
    m = math.fsum(v) / n
    if n == 1:
        return m, 0.0
    var = math.fsum((x - m) ** 2 for x in v) / (n - 1)
    return m, math.sqrt(var)


def by_seed(runs: Paired) -> dict[Any, float]:
    """Normalise ``{seed: value}`` or ``[(seed, value), ...]`` to ``{seed: float}``, dropping unusable values."""
    items = runs.items() if isinstance(runs, Mapping) else runs
    return {seed: float(v) for seed, v in items if _usable(v)}


def paired(a_runs: Paired, b_runs: Paired) -> list[tuple[float, float]]:
    """``[(a_i, b_i)]`` over the seeds usable on both sides (the intersection), in sorted-seed order."""
    a, b = by_seed(a_runs), by_seed(b_runs)
    return [(a[s], b[s]) for s in sorted(set(a) & set(b), key=order_key)]


def order_key(v: Any) -> tuple[int, float, str]:
    """Numbers first, in order, then anything else by its text (seeds, x values)."""
    return (0, float(v), "") if isinstance(v, int | float) and not isinstance(v, bool) else (1, 0.0, str(v))


def delta(a_runs: Paired, b_runs: Paired) -> tuple[float, float]:
    """Mean ± sample std of ``a_i - b_i`` over seeds present in both; ``(nan, nan)`` if none."""
    return mean_std(x - y for x, y in paired(a_runs, b_runs))


def speedup(a_runs: Paired, b_runs: Paired, higher_is_better: bool = True) -> tuple[float, float]:
    """Mean ± sample std of the per-seed speedup of ``a`` over ``b``.

    ``higher_is_better=True`` (throughput): ``a_i / b_i``. ``False`` (latency): ``b_i / a_i``. Pairs with a zero
    denominator are dropped. ``(nan, nan)`` if no seed pairs up.
    """
    ratios = []
    for x, y in paired(a_runs, b_runs):
        num, den = (x, y) if higher_is_better else (y, x)
        if den != 0:
            ratios.append(num / den)
    return mean_std(ratios)


def fmt_pm(m: float | None, s: float | None, digits: int = 2) -> str:
    """``'12.34 ± 0.56'``; ``'NA'`` when the mean is missing; just the mean when only the std is missing."""
    if not _usable(m):
        return NA
    if not _usable(s):
        return f"{float(m):.{digits}f}"
    return f"{float(m):.{digits}f} ± {float(s):.{digits}f}"
