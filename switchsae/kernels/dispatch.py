"""Expert dispatch → expert compute → combine: the one path from a routing to a code.

A router's :class:`~switchsae.saes.routing.Assignment` lists ``(token, expert, gate)`` entries
grouped by expert. :func:`dispatch` gathers each entry's input row, so every expert's tokens are
one contiguous slice; :func:`grouped_select_topk` runs one selection matmul per expert on its
slice and keeps each entry's ``k`` largest pre-activations (the expert compute); :func:`combine`
turns entries back into one code per token. This is the one place a Switch SAE touches its
experts' encoders, so it is also where the all-to-all pair goes when experts are split across
devices. Only the chosen experts' ``M/N`` pre-activations are ever materialised for an entry:
memory ``E·M/N`` floats, not ``T·M``. Experts are stored stacked along the latent axis: expert
``e`` owns rows ``[e·m, (e+1)·m)``, so codes carry global latent ids.

With one entry per token (top-1, hash, balanced) the code is the entry's own TopK and the
Switch SAE runs its whole forward and backward in this expert-sorted order, so consecutive
tokens gather from the same expert's ``m`` weight rows (which stay in cache); only the
reconstruction and the code are put back in token order. With several entries per token
(top-e, a shared expert, expert choice) :func:`combine` takes one TopK over the union of the
token's entries' candidates: the global TopK over its experts' latents, since each expert's
contribution to it is among that expert's own ``k`` largest.
"""
from __future__ import annotations

import torch
from torch import Tensor

from switchsae.kernels import native
from switchsae.kernels.sparse import largest_entries


def dispatch(x: Tensor, token: Tensor) -> Tensor:
    """The input row of every entry, ``x[token]``: entries grouped by expert, ``[E, d]``."""
    return x.index_select(0, token)


def union_slots(values: Tensor, token: Tensor, n_tokens: int, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Where each token's code comes from: the ``k`` largest of all candidates of its entries
    (``values: [E, c]``, entry ``e`` belonging to token ``token[e]``). Returns ``best, entry, slot,
    valid: [T, k]``: the value, the entry and the slot within the entry of every chosen candidate,
    and whether it is one (a token with fewer than ``k`` finite candidates has invalid slots)."""
    n_entries, k_entry = values.shape
    device = values.device
    order = torch.argsort(token, stable=True)
    per_token = torch.bincount(token, minlength=n_tokens)
    slots = int(per_token.max()) if n_entries else 0
    slot = torch.arange(n_entries, device=device) - (per_token.cumsum(0) - per_token)[token.index_select(0, order)]
    rows = token.index_select(0, order)
    candidates = torch.full((n_tokens, max(slots, 1), k_entry), float("-inf"), device=device)
    entry_of = torch.zeros((n_tokens, max(slots, 1)), dtype=torch.long, device=device)
    candidates[rows, slot] = values.index_select(0, order)
    entry_of[rows, slot] = order
    flat = candidates.view(n_tokens, -1)
    best, where = flat.topk(min(k, flat.shape[1]), dim=-1, sorted=False)
    return best, entry_of.gather(1, where // k_entry), where % k_entry, best > float("-inf")


def combine(values: Tensor, indices: Tensor, gate: Tensor, token: Tensor, n_tokens: int,
            k: int) -> tuple[Tensor, Tensor, Tensor]:
    """One code per token from its entries' candidates: the ``k`` largest pre-activations among
    all of token ``t``'s entries, ``values, indices, gate: [T, k]`` in token order (each selected
    latent carries the gate of the entry it came from). A token with fewer than ``k`` candidates
    (or none) is padded with value 0, index 0, gate 0 (no latent, no gradient)."""
    best, entry, slot, valid = union_slots(values, token, n_tokens, k)
    k_entry, shape = values.shape[1], best.shape
    chosen = indices.view(-1).index_select(0, (entry * k_entry + slot).view(-1)).view(shape)
    return (torch.where(valid, best, 0.0), torch.where(valid, chosen, 0),
            torch.where(valid, gate.index_select(0, entry.view(-1)).view(shape), 0.0))


def grouped_select_topk(
    x_sorted: Tensor, W: Tensor, counts: list[int], k: int, W_selection: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """TopK of ``x_t W_{e_t}ᵀ`` within each token's expert ``e_t``; indices are global latent ids.

    ``x_sorted`` holds the tokens grouped by expert, ``counts[e]`` of them for expert ``e`` (as
    an Assignment holds them); the matmul runs on ``W_selection`` (``W`` in a lower precision, e.g.
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
