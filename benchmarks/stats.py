"""Summary statistics of repeated timings (standard library only)."""

from __future__ import annotations

import math
from typing import Iterable


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks, as numpy.percentile's
    default ('linear'): p90 of [1..10] is 9.1."""
    xs = sorted(float(v) for v in values)
    if not xs:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(values: Iterable[float]) -> float:
    return percentile(values, 50.0)


def summarize(values: Iterable[float]) -> dict | None:
    """{n, median, p90, min, max, mean} of the values; None for no values."""
    xs = [float(v) for v in values]
    if not xs:
        return None
    return {
        "n": len(xs),
        "median": median(xs),
        "p90": percentile(xs, 90.0),
        "min": min(xs),
        "max": max(xs),
        "mean": sum(xs) / len(xs),
    }


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is zero."""
    if a is None or b is None or b == 0:
        return None
    return a / b
