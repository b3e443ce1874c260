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

from switchsae.kernels import native
from switchsae.kernels.sparse import largest_entries


def sort_by_expert(expert: Tensor, n_experts: int) -> tuple[Tensor, list[int]]:
    """The permutation that groups tokens by expert (stable) and each expert's token count."""
    return torch.argsort(expert, stable=True), torch.bincount(expert, minlength=n_experts).tolist()


def grouped_select_topk(
    x_sorted: Tensor, W: Tensor, counts: list[int], k: int, W_selection: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """TopK of ``x_t W_{e_t}ᵀ`` within each token's expert ``e_t``; indices are global latent ids.

    ``x_sorted`` holds the tokens grouped by expert, ``counts[e]`` of them for expert ``e`` (see
    :func:`sort_by_expert`); the matmul runs on ``W_selection`` (``W`` in a lower precision, e.g.
    bf16) where given. On CPU in fp32 the matmul and the top-k run fused, tile by tile
    (:func:`switchsae.kernels.native.grouped_select`: pre-activations stay in cache, threads
    share out tiles of uneven experts). Otherwise :func:`expert_products` fills one ``[T, m]``
    buffer and one top-k runs over it. Returns no-grad fp32 ``values`` and ``indices``, both
    ``[T, k]``, in that same order.
    """
    W_selection = W if W_selection is None else W_selection
    with torch.no_grad():
        if W_selection.dtype == torch.float32 and native.usable(x_sorted, W) and native.fused_selection_available():
            return native.grouped_select(x_sorted, W_selection, counts, k)
        m = W.shape[0] // len(counts)
        pre = expert_products(x_sorted, W_selection, counts, W_selection.dtype)
        first_latent = torch.arange(0, W.shape[0], m, device=x_sorted.device)
        offsets = first_latent.repeat_interleave(torch.tensor(counts, device=x_sorted.device))
        return largest_entries(pre, k, x_sorted, W, offsets)


def expert_products(x_sorted: Tensor, W: Tensor, counts: list[int], dtype: torch.dtype) -> Tensor:
    """``pre[t] = x_t W_{e_t}ᵀ`` in ``dtype``, ``[T, m]``, for tokens grouped by expert.

    One grouped matmul (``torch._grouped_mm``) where torch has a kernel for it (bf16 on CUDA
    devices of compute capability 9.0 and up); otherwise one matmul per expert into its rows of
    the buffer, each expert's weights cast on their own (a cache-sized copy, not all of ``W``).
    """
    n_experts, m = len(counts), W.shape[0] // len(counts)
    x_low = x_sorted.to(dtype)
    if grouped_mm_available(x_sorted.device, dtype):
        ends = torch.tensor(counts, device=x_sorted.device).cumsum(0).to(torch.int32)
        return torch._grouped_mm(x_low, W.to(dtype).view(n_experts, m, -1).transpose(1, 2), offs=ends)
    pre = torch.empty(x_sorted.shape[0], m, dtype=dtype, device=x_sorted.device)
    start = 0
    for e, count in enumerate(counts):
        torch.mm(x_low[start:start + count], W[e * m:(e + 1) * m].to(dtype).t(), out=pre[start:start + count])
        start += count
    return pre


def grouped_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether :func:`expert_products` takes ``torch._grouped_mm`` (a real grouped kernel needs
    CUDA sm90+ and bf16; on CPU torch loops over the groups itself, no faster than ours)."""
    return (hasattr(torch, "_grouped_mm") and dtype == torch.bfloat16 and device.type == "cuda"
            and torch.cuda.get_device_capability(device) >= (9, 0))
