"""Sparse TopK encoder and decoder: only the k selected latents per token cost anything.

Shapes: ``x`` is ``[T, d]``; weights are stored one latent per row, ``W_enc, W_dec: [M, d]``;
codes are ``values, indices: [T, k]``. Everything is float32 except the optional bfloat16
selection matmul.

*Selection* runs the one dense matmul, ``pre = x W_encᵀ`` (``2·T·d·M`` FLOPs), without autograd,
and keeps the indices of the k largest entries per row. *Values* are then attached to the graph
by :class:`GatheredLinear`, whose backward touches only the selected rows:

    z_tj = W_enc[i_tj] · x_t
    ∂L/∂x_t        = Σ_j g_tj W_enc[i_tj]       (an embedding-bag sum, O(T·k·d))
    ∂L/∂W_enc[i]  += g_tj x_t   for i = i_tj    (the embedding-bag weight gradient)

instead of a dense ``[T, M]`` gradient matmul. :func:`sparse_decode` is
``x̂_t = Σ_j z_tj W_dec[i_tj]``, again an embedding bag, gradients included.
The references these are tested against are :func:`dense_codes` followed by plain matmuls.

With ``sparse_grad`` the weight gradients are coalesced row-sparse tensors over the latents the
batch used, so no ``[M, d]`` gradient is ever allocated and a row-sparse optimizer
(:class:`switchsae.optim.LazyAdam`) updates only those rows.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor, sparse_grad: bool = False) -> Tensor:
    """``x̂_t = Σ_j values_tj · W_dec[indices_tj]`` → ``[T, d]`` (no bias).

    With ``sparse_grad`` the gradient of ``W_dec`` is a coalesced row-sparse tensor over the
    latents used in the batch instead of a dense ``[M, d]`` one.
    """
    return SparseDecode.apply(values, indices, W_dec, sparse_grad)


def active_rows(indices: Tensor, n_rows: int) -> tuple[Tensor, Tensor]:
    """The distinct rows ``indices`` touches (sorted) and ``indices`` renumbered into them."""
    touched = torch.zeros(n_rows, dtype=torch.bool, device=indices.device)
    touched[indices.flatten()] = True
    rows = touched.nonzero().squeeze(1)
    remap = torch.empty(n_rows, dtype=torch.long, device=indices.device)
    remap[rows] = torch.arange(rows.numel(), device=indices.device)
    return rows, remap[indices]


def bag_and_grads(
    indices: Tensor, W: Tensor, weights: Tensor, grad_out: Tensor, need_weights: bool, need_W: bool, sparse: bool
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``out_t = Σ_j weights_tj W[indices_tj]`` and, for upstream gradient ``grad_out``, the
    gradients ``∂L/∂weights_tj = W[indices_tj] · grad_out_t`` (:func:`gather_dot`) and
    ``∂L/∂W[i] = Σ_{tj: indices_tj = i} weights_tj grad_out_t`` (dense, or row-sparse over the
    touched rows only)."""
    grad_weights = gather_dot(grad_out, W, indices) if need_weights else None
    if sparse:
        rows, local = active_rows(indices, W.shape[0])
        W_leaf = W.detach().index_select(0, rows)
    else:
        local, W_leaf = indices, W.detach()
    with torch.enable_grad():
        W_leaf.requires_grad_(need_W)
        out = F.embedding_bag(local, W_leaf, per_sample_weights=weights.detach(), mode="sum")
        grad_W = torch.autograd.grad(out, W_leaf, grad_outputs=grad_out)[0] if need_W else None
    if sparse and grad_W is not None:
        grad_W = torch.sparse_coo_tensor(rows[None], grad_W, W.shape, is_coalesced=True, check_invariants=False)
    return out.detach(), grad_weights, grad_W


class SparseDecode(torch.autograd.Function):
    """:func:`sparse_decode`: an embedding bag forward; backward by :func:`bag_and_grads`."""

    @staticmethod
    def forward(ctx, values: Tensor, indices: Tensor, W: Tensor, sparse_grad: bool = False) -> Tensor:
        ctx.save_for_backward(values, indices, W)
        ctx.sparse_grad = sparse_grad
        return F.embedding_bag(indices, W, per_sample_weights=values, mode="sum")

    @staticmethod
    def backward(ctx, grad: Tensor):
        values, indices, W = ctx.saved_tensors
        _, grad_values, grad_W = bag_and_grads(
            indices, W, values, grad, ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.sparse_grad
        )
        return grad_values, None, grad_W, None


def gather_dot(x: Tensor, W: Tensor, indices: Tensor) -> Tensor:
    """``out_tj = W[indices_tj] · x_t`` (no autograd): the sampled product ``(x Wᵀ)`` at the code's
    pattern (SDDMM on a CSR pattern with ``k`` entries per row), ``O(T·k·d)`` with no ``[T, k, d]``
    gather; about twice as fast on CPU as the embedding bag's per-sample-weight gradient."""
    n_tokens, k = indices.shape
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        pattern = torch.sparse_csr_tensor(
            torch.arange(0, n_tokens * k + 1, k, device=indices.device), indices.flatten(),
            # zeros, not empty: beta = 0 still multiplies the pattern values, and 0 · NaN = NaN
            torch.zeros(n_tokens * k, dtype=W.dtype, device=W.device), (n_tokens, W.shape[0]), check_invariants=False,
        )
        dots = torch.sparse.sampled_addmm(pattern, x.to(W.dtype), W.detach().t(), beta=0.0)
    return dots.values().view(n_tokens, k)


class GatheredLinear(torch.autograd.Function):
    """``z_tj = W[i_tj] · x_t`` with values already known; backward is sparse in both inputs.

    The backward is the embedding bag with per-sample weights ``g`` (giving ``∂L/∂x``) and its
    weight gradient with upstream ``x`` (giving ``∂L/∂W``), dense or row-sparse.
    """

    @staticmethod
    def forward(ctx, x: Tensor, W: Tensor, indices: Tensor, values: Tensor, sparse_grad: bool = False) -> Tensor:
        ctx.save_for_backward(x, W, indices)
        ctx.sparse_grad = sparse_grad
        return values

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, W, indices = ctx.saved_tensors
        grad_x, _, grad_W = bag_and_grads(indices, W, grad, x, False, ctx.needs_input_grad[1], ctx.sparse_grad)
        return (grad_x if ctx.needs_input_grad[0] else None), grad_W, None, None, None


def select_topk(x: Tensor, W: Tensor, k: int, matmul_dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Indices and (no-grad, fp32) values of the k largest ``x W_ᵀ`` entries per row."""
    with torch.no_grad():
        pre = torch.mm(x.to(matmul_dtype), W.to(matmul_dtype).t())
        top = pre.topk(k, dim=-1, sorted=False)
        values = top.values if matmul_dtype == torch.float32 else gather_dot(x, W, top.indices)
    return values.float(), top.indices


def topk_encode(x: Tensor, W: Tensor, indices: Tensor, values: Tensor, sparse_grad: bool = False) -> Tensor:
    """Attach selected pre-activations to the graph and apply the ReLU: ``ReLU(W[i_tj] · x_t)``."""
    return torch.relu(GatheredLinear.apply(x, W, indices, values, sparse_grad))


def dense_codes(values: Tensor, indices: Tensor, width: int) -> Tensor:
    """Reference: scatter a sparse code into a dense ``[T, M]`` matrix.

    Repeated indices in a row add up (as in :func:`sparse_decode`), so zero-valued padding
    entries pointing at latent 0 leave a real latent 0 intact.
    """
    return torch.zeros(values.shape[0], width, dtype=values.dtype, device=values.device).scatter_add(1, indices, values)
