"""Summary statistics of repeated runs (seeds, trials)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n − 1 denominator) of the finite values of ``xs``.

    The standard deviation of a single value is undefined: NaN, as is everything of no values.
    """
    vals = [float(x) for x in xs if x is not None and math.isfinite(float(x))]
    if not vals:
        return math.nan, math.nan
    mean = sum(vals) / len(vals)
    if len(vals) == 1:
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
