"""Summary statistics of the evaluations: balanced accuracy, F1, and a mean with its 95% interval."""
from __future__ import annotations

import math

from torch import Tensor

# two-sided 95% Student-t quantiles t_{0.975, n-1} by sample size n (normal beyond the table)
_T95 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262}


def balanced_accuracy(predicted: Tensor, truth: Tensor) -> float:
    """``½ (TP/(TP+FN) + TN/(TN+FP))`` of boolean predictions against boolean labels; both classes
    must occur in ``truth``."""
    predicted, truth = predicted.bool(), truth.bool()
    if truth.all() or not truth.any():
        raise ValueError("balanced accuracy needs both classes among the labels")
    return 0.5 * (float(predicted[truth].float().mean()) + float((~predicted[~truth]).float().mean()))


def f1_score(predicted: Tensor, truth: Tensor) -> float:
    """``2 TP / (2 TP + FP + FN)`` of boolean predictions (0 when there is nothing to find or find)."""
    predicted, truth = predicted.bool(), truth.bool()
    tp = int((predicted & truth).sum())
    wrong = int((predicted ^ truth).sum())
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + wrong)


def mean_interval(values: list[float]) -> tuple[float, float]:
    """The mean and the half-width of its 95% Student-t interval (0 for a single value)."""
    n = len(values)
    if n == 0:
        raise ValueError("no values to summarise")
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, _T95.get(n, 1.96) * sd / math.sqrt(n)
