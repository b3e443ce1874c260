"""Expert dispatch: sort tokens by expert, one selection matmul per expert on a contiguous slice.

This is the one place a Switch SAE touches its experts' encoders, so it is also where an
all-to-all goes when experts are split across devices. Only the chosen expert's ``M/N``
pre-activations are ever materialised for a token: memory ``T·M/N`` floats, not ``T·M``.
Experts are stored stacked along the latent axis: expert ``e`` owns rows ``[e·m, (e+1)·m)``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from switchsae.kernels.sparse import select_topk


def grouped_select_topk(
    x: Tensor, W: Tensor, expert: Tensor, n_experts: int, k: int, matmul_dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """TopK of ``x_t W_{e_t}ᵀ`` within each token's expert ``e_t``; indices are global latent ids.

    Returns no-grad fp32 ``values`` and ``indices``, both ``[T, k]``, in the tokens' original order.
    """
    m = W.shape[0] // n_experts
    order = torch.argsort(expert, stable=True)
    counts = torch.bincount(expert, minlength=n_experts).tolist()
    x_sorted = x[order]
    values = torch.empty(x.shape[0], k, dtype=torch.float32, device=x.device)
    indices = torch.empty(x.shape[0], k, dtype=torch.long, device=x.device)
    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        rows = order[start:start + count]
        v, i = select_topk(x_sorted[start:start + count], W[e * m:(e + 1) * m], k, matmul_dtype)
        values[rows] = v
        indices[rows] = i + e * m
        start += count
    return values, indices
