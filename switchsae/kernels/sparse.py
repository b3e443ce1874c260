"""Sparse TopK encoder and decoder: only the k selected latents per token cost anything.

Shapes: ``x`` is ``[T, d]``; weights are stored one latent per row, ``W_enc, W_dec: [M, d]``;
codes are ``values, indices: [T, k]``. Everything is float32 except the optional bfloat16
selection matmul.

*Selection* runs the one dense matmul, ``pre = x W_encᵀ`` (``2·T·d·M`` FLOPs), without autograd,
and keeps the indices of the k largest entries per row. *Values* are then attached to the graph
by :class:`GatheredLinear`, whose backward touches only the selected rows:

    z_tj = W_enc[i_tj] · (x_t − b)
    ∂L/∂x_t        = Σ_j g_tj W_enc[i_tj]       (an embedding-bag sum, O(T·k·d))
    ∂L/∂b          = −Σ_i c_i W_enc[i],  c_i = Σ_{tj: i_tj = i} g_tj   (O(M·d) when x needs no grad)
    ∂L/∂W_enc[i]  += g_tj (x_t − b)   for i = i_tj    (Gᵀ(x − b) for the sparse [T, M] matrix G)

instead of a dense ``[T, M]`` gradient matmul. :func:`sparse_decode` is
``x̂_t = Σ_j z_tj W_dec[i_tj]``, again an embedding bag, gradients included.
The references these are tested against are :func:`dense_codes` followed by plain matmuls.
:func:`topk_encode` and :func:`sparse_decode` serve ``encode`` and ``decode``; training fuses the
two with the loss (kernels/core.py), reusing :func:`weight_grad` and :func:`gather_dot`. On CPU
the top-k, the weight gradients and the SDDMM run as compiled kernels (kernels/native.py); the
torch ops here are the fallback and the GPU path.

With ``sparse_grad`` the weight gradients are coalesced row-sparse tensors over the latents the
batch used, so no ``[M, d]`` gradient is ever allocated and a row-sparse optimizer
(:class:`switchsae.optim.LazyAdam`) updates only those rows.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from switchsae.kernels import native


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor, sparse_grad: bool = False) -> Tensor:
    """``x̂_t = Σ_j values_tj · W_dec[indices_tj]`` → ``[T, d]`` (no bias).

    With ``sparse_grad`` the gradient of ``W_dec`` is a coalesced row-sparse tensor over the
    latents used in the batch instead of a dense ``[M, d]`` one.
    """
    return SparseDecode.apply(values, indices, W_dec, sparse_grad)


def code_matrix(values: Tensor, indices: Tensor, width: int) -> Tensor:
    """The code as a ``[T, width]`` CSR matrix with ``k`` stored entries per row (repeats add up)."""
    n_tokens, k = indices.shape
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(
            torch.arange(0, n_tokens * k + 1, k, device=indices.device), indices.flatten(), values.flatten(),
            (n_tokens, width), check_invariants=False,
        )


def active_rows(indices: Tensor, n_rows: int) -> tuple[Tensor, Tensor]:
    """The distinct rows ``indices`` touches (sorted) and ``indices`` renumbered into them."""
    touched = torch.zeros(n_rows, dtype=torch.bool, device=indices.device)
    touched[indices.flatten()] = True
    rows = touched.nonzero().squeeze(1)
    remap = torch.empty(n_rows, dtype=torch.long, device=indices.device)
    remap[rows] = torch.arange(rows.numel(), device=indices.device)
    return rows, remap[indices]


def weight_grad(weights: Tensor, indices: Tensor, inputs: Tensor, n_rows: int, sparse: bool,
                rows_of: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """``G[i] = Σ_{tj: indices_tj = i} weights_tj · inputs_t``, i.e. ``Sᵀ inputs`` for the sparse
    ``[T, n_rows]`` matrix ``S`` holding ``weights`` at ``indices``: the weight gradient of an
    embedding bag (``weights`` the upstream gradient or the code, ``inputs`` the other operand).

    Dense ``[n_rows, d]``, or with ``sparse`` a coalesced row-sparse tensor over the touched rows
    only. With ``rows_of`` (a ``[n_rows, d]`` matrix) also ``Σ_tj weights_tj rows_of[indices_tj]``,
    from the per-row weight sums (an encoder's bias gradient), else None. On CPU the compiled
    kernel buckets the entries by row and sums each bucket in registers (timings:
    ``benchmarks/kernels.py``); elsewhere a transposed CSR times dense matmul.
    """
    if not sparse:
        return _transposed_product(weights, indices, inputs, n_rows, rows_of)
    rows, local = active_rows(indices, n_rows)
    values, row_sum = _transposed_product(weights, local, inputs, rows.numel(), rows_of, rows)
    grad = torch.sparse_coo_tensor(rows[None], values, (n_rows, inputs.shape[1]), is_coalesced=True,
                                   check_invariants=False)
    return grad, row_sum


def _transposed_product(weights: Tensor, rows: Tensor, inputs: Tensor, n_rows: int, rows_of: Tensor | None = None,
                        row_ids: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Compiled kernel or CSR matmul; ``rows_of[row_ids[i]]`` (``rows_of[i]`` without ids) is bucket ``i``'s row."""
    if native.usable(weights, rows, inputs):
        return native.transposed_product(weights, rows, inputs, n_rows, rows_of, row_ids)
    product = code_matrix(weights, rows, n_rows).t() @ inputs
    if rows_of is None:
        return product, None
    return product, weighted_rows_sum(weights, rows if row_ids is None else row_ids[rows], rows_of)


class SparseDecode(torch.autograd.Function):
    """:func:`sparse_decode`: an embedding bag forward; ``∂L/∂values`` by :func:`gather_dot`,
    ``∂L/∂W`` by :func:`weight_grad`."""

    @staticmethod
    def forward(ctx, values: Tensor, indices: Tensor, W: Tensor, sparse_grad: bool = False) -> Tensor:
        ctx.save_for_backward(values, indices, W)
        ctx.sparse_grad = sparse_grad
        return F.embedding_bag(indices, W, per_sample_weights=values, mode="sum")

    @staticmethod
    def backward(ctx, grad: Tensor):
        values, indices, W = ctx.saved_tensors
        grad_values = gather_dot(grad, W, indices) if ctx.needs_input_grad[0] else None
        grad_W = weight_grad(values, indices, grad, W.shape[0], ctx.sparse_grad)[0] if ctx.needs_input_grad[2] else None
        return grad_values, None, grad_W, None


def gather_dot(x: Tensor, W: Tensor, indices: Tensor) -> Tensor:
    """``out_tj = W[indices_tj] · x_t`` (no autograd): the sampled product ``(x Wᵀ)`` at the code's
    pattern (SDDMM on a CSR pattern with ``k`` entries per row), ``O(T·k·d)`` with no ``[T, k, d]``
    gather; on CPU faster than the embedding bag's per-sample-weight gradient, and the compiled
    loop of kernels/native.py faster again (timings: ``benchmarks/kernels.py``)."""
    if native.usable(x, W, indices):
        return native.gather_dot(x, W.detach(), indices)
    if indices.shape[1] > W.shape[0]:  # more slots than rows (AuxK padding a small shard): a CSR pattern
        # denser than the matrix is refused by sampled_addmm; then W is small and a gather is cheap
        return torch.einsum("tkd,td->tk", W.detach()[indices], x.to(W.dtype))
    # zeros, not empty: beta = 0 still multiplies the pattern values, and 0 · NaN = NaN
    pattern = code_matrix(torch.zeros(indices.shape, dtype=W.dtype, device=W.device), indices, W.shape[0])
    dots = torch.sparse.sampled_addmm(pattern, x.to(W.dtype), W.detach().t(), beta=0.0)
    return dots.values().view(indices.shape)


class GatheredLinear(torch.autograd.Function):
    """``z_tj = W[i_tj] · (x_t − b) + c[i_tj]`` with values already known (``c`` an optional encoder
    bias); backward is sparse in every input:

        ∂L/∂x_t = Σ_j g_tj W[i_tj]   (an embedding bag with per-sample weights g)
        ∂L/∂b    = −Σ_t ∂L/∂x_t = −Σ_i c_i W[i]   with c_i = Σ_{tj: i_tj = i} g_tj
        ∂L/∂W    = :func:`weight_grad` of g with upstream x − b (dense or row-sparse)
        ∂L/∂c_i  = Σ_{tj: i_tj = i} g_tj

    When ``x`` needs no gradient (activations read from a model or a cache) the bias gradient
    reads each used row of ``W`` once instead of once per token and slot.
    """

    @staticmethod
    def forward(ctx, x: Tensor, b: Tensor, W: Tensor, indices: Tensor, values: Tensor, centred: Tensor,
                sparse_grad: bool = False, enc_bias: Tensor | None = None) -> Tensor:
        ctx.save_for_backward(W, indices, centred)
        ctx.sparse_grad = sparse_grad
        return values

    @staticmethod
    def backward(ctx, grad: Tensor):
        W, indices, centred = ctx.saved_tensors
        W = W.detach()
        grad_x = F.embedding_bag(indices, W, per_sample_weights=grad, mode="sum") if ctx.needs_input_grad[0] else None
        needs_rows_sum = ctx.needs_input_grad[1] and grad_x is None
        grad_W, rows_sum = encoder_grads(grad, indices, centred, W, ctx.sparse_grad, ctx.needs_input_grad[2],
                                         needs_rows_sum)
        grad_b = grad_enc_bias = None
        if ctx.needs_input_grad[1]:
            total = grad_x.sum(0) if grad_x is not None else rows_sum
            assert total is not None  # encoder_grads returns the row sum when asked (needs_rows_sum)
            grad_b = -total
        if ctx.needs_input_grad[7]:
            grad_enc_bias = grad.new_zeros(W.shape[0]).index_add_(0, indices.flatten(), grad.flatten())
        return grad_x, grad_b, grad_W, None, None, None, None, grad_enc_bias


def encoder_grads(grad: Tensor, indices: Tensor, centred: Tensor, W: Tensor, sparse: bool, needs_W: bool,
                  needs_rows_sum: bool) -> tuple[Tensor | None, Tensor | None]:
    """For gathered values ``v_tj = W[i_tj] · centred_t`` with upstream ``grad``: ``∂L/∂W``
    (:func:`weight_grad`, if ``needs_W``) and ``Σ_tj grad_tj W[i_tj]`` (the bias gradient's
    part, if ``needs_rows_sum``), both from one bucketing of the entries where both are wanted."""
    grad_W = rows_sum = None
    if needs_W:
        grad_W, rows_sum = weight_grad(grad, indices, centred, W.shape[0], sparse, W if needs_rows_sum else None)
    if needs_rows_sum and rows_sum is None:
        rows_sum = weighted_rows_sum(grad, indices, W)
    return grad_W, rows_sum


def weighted_rows_sum(weights: Tensor, indices: Tensor, W: Tensor, n_bags: int = 64) -> Tensor:
    """``Σ_tj weights_tj W[indices_tj]`` → ``[d]``: per-row weight sums first, then one pass over
    the used rows, cut into ``n_bags`` embedding bags (one bag would run on one thread) whose
    sums are added."""
    rows, local = active_rows(indices, W.shape[0])
    row_weights = torch.zeros(rows.numel(), dtype=weights.dtype, device=weights.device)
    row_weights.index_add_(0, local.flatten(), weights.flatten())
    starts = torch.arange(0, rows.numel(), max(1, -(-rows.numel() // n_bags)), device=rows.device)
    return F.embedding_bag(rows, W, starts, per_sample_weights=row_weights, mode="sum").sum(0)


def select_topk(x: Tensor, W: Tensor, k: int, W_selection: Tensor | None = None,
                bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Indices and (no-grad, fp32) values of the k largest ``x Wᵀ (+ bias)`` entries per row; the
    matmul runs on ``W_selection`` (``W`` in a lower precision, e.g. bf16) where given."""
    W_selection = W if W_selection is None else W_selection
    with torch.no_grad():
        pre = torch.mm(x.to(W_selection.dtype), W_selection.t())
        if bias is not None:
            pre += bias.to(pre.dtype)
        return largest_entries(pre, k, x, W, bias=bias)


def largest_entries(pre: Tensor, k: int, x: Tensor, W: Tensor, offsets: Tensor | None = None,
                    bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The ``k`` largest entries of each row of the selection pre-activations ``pre ≈ x Wᵀ + bias``.

    Returns fp32 ``values`` and ``indices``, ``[T, k]``, in no particular order, with row ``t``'s
    indices shifted by ``offsets[t]`` (an expert's first latent, see kernels/dispatch.py). A
    ``pre`` in lower precision only selects: the values are recomputed in fp32 as
    ``W[indices_tj] · x_t + bias[indices_tj]`` (:func:`gather_dot`). On CPU the compiled top-k of
    kernels/native.py replaces ``torch.topk`` (timings: ``benchmarks/kernels.py``).
    """
    if native.usable(pre, dtypes=(torch.float32, torch.bfloat16)):
        values, indices = native.topk(pre, k, offsets)
    else:
        values, indices = pre.topk(k, dim=-1, sorted=False)
        indices = indices if offsets is None else indices + offsets[:, None]
    if pre.dtype != torch.float32:
        values = gather_dot(x, W, indices)
        if bias is not None:
            values = values + bias.detach()[indices]
    return values.float(), indices


def topk_encode(x: Tensor, b: Tensor, W: Tensor, indices: Tensor, values: Tensor, sparse_grad: bool = False,
                centred: Tensor | None = None, enc_bias: Tensor | None = None) -> Tensor:
    """Attach the selected pre-activations ``values = W[i_tj] · (x_t − b) (+ enc_bias[i_tj])`` to
    the graph and apply the ReLU, gradients flowing to ``x``, ``b``, ``W`` and ``enc_bias``.
    ``centred`` is ``x − b`` where the caller has it already (it selected on it)."""
    if centred is None:
        with torch.no_grad():
            centred = x - b
    return torch.relu(GatheredLinear.apply(x, b, W, indices, values, centred, sparse_grad, enc_bias))


def dense_codes(values: Tensor, indices: Tensor, width: int) -> Tensor:
    """Reference: scatter a sparse code into a dense ``[T, M]`` matrix.

    Repeated indices in a row add up (as in :func:`sparse_decode`), so zero-valued padding
    entries pointing at latent 0 leave a real latent 0 intact.
    """
    return torch.zeros(values.shape[0], width, dtype=values.dtype, device=values.device).scatter_add(1, indices, values)
