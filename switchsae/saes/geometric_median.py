"""Geometric median, the paper's initialisation of ``b_pre`` and ``b_r``."""
from __future__ import annotations

from torch import Tensor


def geometric_median(points: Tensor, iters: int = 100, tol: float = 1e-6) -> Tensor:
    """``argmin_y Σ_t ‖x_t − y‖`` by Weiszfeld's iteration, started at the mean.

    Each step is ``y ← Σ_t w_t x_t / Σ_t w_t`` with ``w_t = 1 / max(‖x_t − y‖, ε)``; stops when
    ``y`` moves less than ``tol`` relative to its norm.
    """
    x = points.double()
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(1e-12)
        y_next = (w[:, None] * x).sum(0) / w.sum()
        moved = (y_next - y).norm()
        y = y_next
        if moved <= tol * y.norm().clamp_min(1e-12):
            break
    return y.to(points.dtype)
