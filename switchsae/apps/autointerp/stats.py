"""Scores of automated interpretation: balanced accuracy of one feature's test, and the mean over
features with a Student-t confidence interval.

    balanced accuracy = (TP / (TP + FN) + TN / (TN + FP)) / 2      (None without both classes)
    mean ± t_{(1+c)/2, n-1} · s / √n                                 s: sample standard deviation

The t quantile is computed here (regularised incomplete beta by Lentz's continued fraction, then
bisection), so no statistics package is needed.
"""
from __future__ import annotations

import math
from collections.abc import Iterable


def confusion(truth: Iterable[bool], predicted: Iterable[bool]) -> dict[str, int]:
    """``tp, fn, tn, fp`` counts of predictions against the truth."""
    counts = {"tp": 0, "fn": 0, "tn": 0, "fp": 0}
    for t, p in zip(truth, predicted, strict=True):
        counts[("tp" if p else "fn") if t else ("fp" if p else "tn")] += 1
    return counts


def balanced_accuracy(counts: dict[str, int]) -> float | None:
    """Mean of the recall on positives and on negatives; None if either class has no example."""
    positives, negatives = counts["tp"] + counts["fn"], counts["tn"] + counts["fp"]
    if positives == 0 or negatives == 0:
        return None
    return (counts["tp"] / positives + counts["tn"] / negatives) / 2


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + numerator * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function ``I_x(a, b)``."""
    if x <= 0 or x >= 1:
        return 0.0 if x <= 0 else 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1 - math.exp(log_front) * _betacf(b, a, 1 - x) / b


def t_cdf(t: float, dof: float) -> float:
    """Student-t cumulative distribution function with ``dof`` degrees of freedom."""
    tail = 0.5 * _betainc(dof / 2, 0.5, dof / (dof + t * t))
    return 1 - tail if t > 0 else tail


def t_quantile(p: float, dof: float) -> float:
    """The ``p`` quantile of Student's t (bisection on :func:`t_cdf`, to 1e-10)."""
    lo, hi = -1e3, 1e3
    while hi - lo > 1e-10:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, dof) < p else (lo, mid)
    return (lo + hi) / 2


def mean_ci(values: list[float], level: float = 0.95) -> dict:
    """``{n, mean, lo, hi, level}``: the mean of ``values`` and its t interval (lo = hi = mean for
    one value; all None for none)."""
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "lo": None, "hi": None, "level": level}
    mean = sum(values) / n
    half = 0.0
    if n > 1:
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
        half = t_quantile((1 + level) / 2, n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "lo": mean - half, "hi": mean + half, "level": level}
