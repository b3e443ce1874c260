"""Expert dispatch: sort tokens by expert, one selection matmul per expert on a contiguous slice.

This is the one place a Switch SAE touches its experts' encoders, so it is also where an
all-to-all goes when experts are split across devices. Only the chosen expert's ``M/N``
pre-activations are ever materialised for a token: memory ``T·M/N`` floats, not ``T·M``.
Experts are stored stacked along the latent axis: expert ``e`` owns rows ``[e·m, (e+1)·m)``.

The Switch SAE runs its whole forward and backward in this sorted order, so consecutive tokens
gather from the same expert's ``m`` weight rows (which stay in cache) and no result has to be
scattered back per expert; only the reconstruction and the code are put back in token order.
"""
from __future__ import annotations

import torch
from torch import Tensor

from switchsae.kernels.sparse import select_topk


def sort_by_expert(expert: Tensor, n_experts: int) -> tuple[Tensor, list[int]]:
    """The permutation that groups tokens by expert (stable) and each expert's token count."""
    return torch.argsort(expert, stable=True), torch.bincount(expert, minlength=n_experts).tolist()


def grouped_select_topk(
    x_sorted: Tensor, W: Tensor, counts: list[int], k: int, matmul_dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """TopK of ``x_t W_{e_t}ᵀ`` within each token's expert ``e_t``; indices are global latent ids.

    ``x_sorted`` holds the tokens grouped by expert, ``counts[e]`` of them for expert ``e`` (see
    :func:`sort_by_expert`). Returns no-grad fp32 ``values`` and ``indices``, both ``[T, k]``,
    in that same order.
    """
    m = W.shape[0] // len(counts)
    values, indices, start = [], [], 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        v, i = select_topk(x_sorted[start:start + count], W[e * m:(e + 1) * m], k, matmul_dtype)
        values.append(v)
        indices.append(i + e * m)
        start += count
    return torch.cat(values), torch.cat(indices)
