"""Paired comparison of two variants over seeds: mean difference and a t-distribution confidence interval.

Runs of two variants with the same seed see the same batches in the same order (the seed fixes the
data order and the initialisation), so their losses are compared as pairs: d_i = a_i - b_i. With n
pairs, mean d, sample standard deviation s (n - 1 in the denominator), standard error s / sqrt(n):

    CI = mean -/+ t_{(1 + confidence) / 2, n - 1} * s / sqrt(n)

The interval "excludes zero" when both ends have the same sign: at that confidence the difference is
not seed noise. The two-sided p-value of the paired t-test is reported beside it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from scipy import stats as _scipy_stats


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> dict:
    """Statistics of a - b over pairs (a[i], b[i]); ``ci``/``p_value`` are None with fewer than 2 pairs."""
    if len(a) != len(b):
        raise ValueError(f"paired samples need equal lengths, got {len(a)} and {len(b)}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    d = [float(x) - float(y) for x, y in zip(a, b)]
    n = len(d)
    if n == 0:
        raise ValueError("no pairs to compare")
    mean = sum(d) / n
    out = {"n": n, "mean": mean, "sd": None, "se": None, "t_crit": None, "ci": None, "excludes_zero": None,
           "p_value": None, "confidence": confidence, "differences": d}
    if n < 2:
        return out
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    se = sd / math.sqrt(n)
    t_crit = float(_scipy_stats.t.ppf((1 + confidence) / 2, n - 1))
    lo, hi = mean - t_crit * se, mean + t_crit * se
    if se > 0:
        p = float(2 * _scipy_stats.t.sf(abs(mean) / se, n - 1))
    else:  # every pair differs by the same amount
        p = 0.0 if mean != 0 else 1.0
    out.update(sd=sd, se=se, t_crit=t_crit, ci=(lo, hi), excludes_zero=lo > 0 or hi < 0, p_value=p)
    return out


def mean_sd(xs: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    n = len(xs)
    if n == 0:
        raise ValueError("no values")
    m = sum(xs) / n
    if n < 2:
        return m, None
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))


def describe(cmp: dict, digits: int = 4) -> str:
    """One line: 'mean -0.0123 [-0.0201, -0.0045] (n=3): excludes zero'."""
    if cmp["ci"] is None:
        return f"mean {cmp['mean']:+.{digits}f} (n={cmp['n']}): no interval with one pair"
    lo, hi = cmp["ci"]
    verdict = "excludes zero" if cmp["excludes_zero"] else "includes zero"
    return f"mean {cmp['mean']:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}] (n={cmp['n']}): {verdict}"


__all__ = ["describe", "mean_sd", "paired_difference"]
