"""Summary statistics of repeated runs (seeds, trials)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def claim(deltas: Sequence[float], min_n: int = 3) -> str:
    """The claim rule for paired differences (run − reference, one per seed).

    ``"helps"`` / ``"hurts"`` only when there are at least ``min_n`` of them, every one has the
    same sign, and |mean| > 2 × their sample standard deviation; otherwise ``"no effect shown"``.
    """
    vals = [float(d) for d in deltas if d is not None and math.isfinite(float(d))]
    if len(vals) < min_n:
        return "no effect shown"
    mean, sd = mean_std(vals)
    same_sign = all(v > 0 for v in vals) or all(v < 0 for v in vals)
    if same_sign and abs(mean) > 2 * sd:
        return "helps" if mean > 0 else "hurts"
    return "no effect shown"


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


def format_pm(mean: float, sd: float, digits: int = 2, signed: bool = False,
              missing: str = "") -> str:
    """``mean ± sd`` with ``digits`` decimals (``+`` shown with ``signed``); the sd left out when
    it is NaN (one value), ``missing`` when the mean is NaN."""
    if math.isnan(mean):
        return missing
    text = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    return text if math.isnan(sd) else f"{text} ± {sd:.{digits}f}"
