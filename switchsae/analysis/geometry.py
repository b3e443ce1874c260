"""Geometry of trained dictionaries: duplication across experts, router alignment, Pareto fronts.

Pure functions on tensors (or point lists); no I/O. Decoder rows are ``W_dec: [M, d]`` with
expert ``e`` owning rows ``[e·m, (e+1)·m)``, ``m = M/N`` (as in :class:`switchsae.saes.SwitchSAE`).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from torch.nn.functional import normalize

# Similarity entries computed at once (64 MiB of fp32), so M = 65,536 needs no M x M matrix.
BLOCK_ELEMENTS = 2**24


def _expert_width(n_rows: int, n_experts: int) -> int:
    if n_experts < 1 or n_rows % n_experts:
        raise ValueError(f"{n_rows} decoder rows cannot be split evenly into {n_experts} experts.")
    return n_rows // n_experts


def expert_duplication(W_dec: Tensor, n_experts: int, threshold: float = 0.9) -> dict:
    """For each decoder row ``j`` of expert ``e(j)``, its closest row in any other expert::

        s_j = max_{i : e(i) ≠ e(j)} cos(W_dec[j], W_dec[i])

    Returns ``max_cos`` (``[M]``), ``mean_max_cos`` (mean of ``s``) and ``frac_above`` (fraction
    of rows with ``s_j > threshold``: features some other expert has learned too). Rows are
    processed in blocks against the whole normalised matrix, masking the block's own experts.
    """
    if n_experts < 2:
        raise ValueError(f"duplication across experts needs at least two experts, got {n_experts}.")
    width = _expert_width(W_dec.shape[0], n_experts)
    unit = normalize(W_dec.detach().float(), dim=1)
    expert_of = torch.arange(unit.shape[0]) // width
    block = max(1, BLOCK_ELEMENTS // unit.shape[0])
    max_cos = torch.empty(unit.shape[0])
    for start in range(0, unit.shape[0], block):
        sims = unit[start:start + block] @ unit.t()
        own = expert_of[start:start + block, None] == expert_of[None, :]
        max_cos[start:start + block] = sims.masked_fill_(own, float("-inf")).amax(dim=1)
    return {"max_cos": max_cos, "mean_max_cos": max_cos.mean().item(),
            "frac_above": (max_cos > threshold).float().mean().item()}


def router_alignment(W_router: Tensor, W_dec: Tensor, n_experts: int) -> Tensor:
    """``cos(W_r[i], u_i)`` for each expert ``i``, ``u_i`` the mean of expert ``i``'s unit decoder rows: ``[N]``."""
    width = _expert_width(W_dec.shape[0], n_experts)
    if W_router.shape != (n_experts, W_dec.shape[1]):
        raise ValueError(f"router of shape {tuple(W_router.shape)} does not match {n_experts} experts "
                         f"of width d={W_dec.shape[1]}.")
    mean_dirs = normalize(W_dec.detach().float(), dim=1).view(n_experts, width, -1).mean(dim=1)
    return torch.cosine_similarity(W_router.detach().float(), mean_dirs, dim=1)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the lower-left front (both coordinates minimised), by increasing ``x``.

    A point is on the front when no other point has ``x' ≤ x`` and ``y' < y`` (for equal
    points, the first one given is kept).
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1], i))
    front, best_y = [], float("inf")
    for i in order:
        if points[i][1] < best_y:
            front.append(i)
            best_y = points[i][1]
    return front
