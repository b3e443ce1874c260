"""The TopK family's training forward and backward as one autograd function.

Notation as in kernels/sparse.py: ``x: [T, d]`` normalised activations, ``W_enc, W_dec: [M, d]``
one latent per row, ``i, v: [T, k]`` the selected latents and their pre-activations
``v_tj = W_enc[i_tj] · (x_t − b)`` (from the no-grad selection), ``b`` the input bias ``b_pre``:

    a_tj = ReLU(v_tj),   z_tj = p_tj a_tj      (p: a Switch SAE's router gate per token or per entry, else 1)
    x̂_t = b + Σ_j z_tj W_dec[i_tj],   r_t = x̂_t − x_t,   mse = (1/T) Σ_t ‖r_t‖²

Forward gathers each token's k decoder rows once for x̂_t, r_t and, while those rows are in cache,
``P_tj = W_dec[i_tj] · r_t`` (compiled kernel on CPU): the squared error's value gradient is
``(2/T) P``, so its backward needs no second gather of the rows (an SDDMM). Backward, with
``G_t = ∂L/∂x̂_t = g_x̂_t + (2 g_mse / T) r_t``:

    ∂L/∂z_tj = W_dec[i_tj] · g_x̂_t + (2 g_mse / T) P_tj + g_z_tj
    ∂L/∂p_tj = ∂L/∂z_tj a_tj (summed over j for a gate per token),   ∂L/∂v_tj = p_tj 1[v_tj > 0] ∂L/∂z_tj
    ∂L/∂W_dec[i] = Σ_{tj: i_tj = i} z_tj G_t,      ∂L/∂W_enc[i] = Σ_{tj: i_tj = i} ∂L/∂v_tj (x_t − b)
    ∂L/∂b = Σ_t G_t − Σ_tj ∂L/∂v_tj W_enc[i_tj]
    ∂L/∂x_t = Σ_j ∂L/∂v_tj W_enc[i_tj] − (2 g_mse / T) r_t

When only ``mse`` feeds the loss (training), ``G = (2 g_mse / T) r`` and no ``[T, d]`` pass is
spent on it: the factor goes onto the ``[T, k]`` decoder weights and onto ``Σ_t r_t``, which the
forward kernel sums as it goes. tests/kernels/test_core.py checks values and every gradient
against the same function written densely for autograd.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from switchsae.kernels import native
from switchsae.kernels.sparse import encoder_grads, gather_dot, weight_grad


def sparse_core(x: Tensor, b: Tensor, W_enc: Tensor, W_dec: Tensor, indices: Tensor, values: Tensor,
                centred: Tensor, gate: Tensor | None = None, sparse_grad: bool = False,
                x_hat_rows: Tensor | None = None, x_hat_scale: float = 1.0,
                mse_tokens: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(z, x̂, mse)`` of the formulas above, differentiable in ``x, b, W_enc, W_dec, gate``.

    ``gate`` is ``[T]`` (one expert per token) or ``[T, k]`` (a gate per selected latent, from
    the entry it came from).
    ``values`` are the selected pre-activations ``v`` (no grad), ``centred`` is ``x − b`` (no
    grad; the selection computed it); ``sparse_grad`` makes the weight gradients row-sparse.
    ``x̂`` comes out times ``x_hat_scale`` with token ``t`` in row ``x_hat_rows[t]`` (a permutation;
    row ``t`` if None): a Switch SAE works on tokens grouped by expert and returns the
    reconstruction in token order and raw units without another pass. ``mse_tokens`` replaces ``T``
    in ``mse = (1/T) Σ_t ‖r_t‖²`` (expert parallelism: a rank's squared error over the entries it
    received, per token of its own batch; distributed/expert_parallel.py), so no rows gives 0.
    """
    differentiable = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, b, W_enc, W_dec, gate))
    return SparseCore.apply(x, b, W_enc, W_dec, gate, indices, values, centred, sparse_grad, x_hat_rows,
                            x_hat_scale, x.shape[0] if mse_tokens is None else mse_tokens, differentiable)


def decode_residual(z: Tensor, indices: Tensor, W: Tensor, b: Tensor, x: Tensor, value_grads: bool,
                    out_rows: Tensor | None = None, out_scale: float = 1.0,
                    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor]:
    """``(x̂ placed and scaled, r, P or None, Σ_t ‖r_t‖², Σ_t r_t)`` (see native.decode_residual):
    the compiled one-pass kernel on CPU, else torch ops."""
    if native.usable(z, indices, W, b, x):
        x_hat, residual, P, squares, residual_sum = native.decode_residual(z, indices, W, b, x, value_grads,
                                                                           out_rows, out_scale)
        return x_hat, residual, P, torch.tensor(squares, dtype=torch.float32), residual_sum
    x_hat = F.embedding_bag(indices, W, per_sample_weights=z, mode="sum") + b
    residual = x_hat - x
    P = gather_dot(residual, W, indices) if value_grads else None
    x_hat = x_hat.mul_(out_scale) if out_rows is None else torch.empty_like(x_hat).index_copy_(0, out_rows,
                                                                                              x_hat.mul_(out_scale))
    flat = residual.flatten()
    return x_hat, residual, P, flat.dot(flat), residual.sum(0)


def _per_entry(gate: Tensor) -> Tensor:
    """A gate per token ``[T]`` or per entry ``[T, k]``, broadcastable against ``[T, k]``."""
    return gate[:, None] if gate.ndim == 1 else gate


class SparseCore(torch.autograd.Function):
    """:func:`sparse_core`; see the module docstring for the gradients."""

    @staticmethod
    def forward(ctx, x: Tensor, b: Tensor, W_enc: Tensor, W_dec: Tensor, gate: Tensor | None, indices: Tensor,
                values: Tensor, centred: Tensor, sparse_grad: bool, x_hat_rows: Tensor | None, x_hat_scale: float,
                mse_tokens: int, differentiable: bool) -> tuple[Tensor, Tensor, Tensor]:
        ctx.set_materialize_grads(False)
        z = values.clamp_min(0) if gate is None else values.clamp_min(0) * _per_entry(gate)
        # the value gradients only where a backward can follow (needs_input_grad ignores no_grad mode)
        x_hat, residual, P, squares, residual_sum = decode_residual(z, indices, W_dec, b, x, differentiable,
                                                                    x_hat_rows, x_hat_scale)
        ctx.save_for_backward(W_enc, W_dec, gate, indices, values, z, centred, residual, P, residual_sum, x_hat_rows)
        ctx.sparse_grad, ctx.x_hat_scale, ctx.mse_tokens = sparse_grad, x_hat_scale, mse_tokens
        return z, x_hat, squares / max(mse_tokens, 1)

    @staticmethod
    def backward(ctx, g_z: Tensor | None, g_x_hat: Tensor | None, g_mse: Tensor | None):
        W_enc, W_dec, gate, indices, values, z, centred, residual, P, residual_sum, x_hat_rows = ctx.saved_tensors
        needs_x, needs_b, needs_enc, needs_dec, needs_gate = ctx.needs_input_grad[:5]
        width = W_enc.shape[0]
        scale = torch.zeros((), dtype=residual.dtype) if g_mse is None else 2 * g_mse / max(ctx.mse_tokens, 1)
        if g_x_hat is not None:  # back to the rows and units the core works in
            g_x_hat = (g_x_hat if x_hat_rows is None else g_x_hat.index_select(0, x_hat_rows)) * ctx.x_hat_scale

        # ∂L/∂x̂ = g_x̂ + scale·r: kept factored (decoder weights z·scale against r) unless g_x̂ flows too
        if g_x_hat is None:
            dec_weights, dec_inputs, grad_x_hat_sum = z * scale, residual, scale * residual_sum
        else:
            dec_weights, dec_inputs = z, g_x_hat + scale * residual
            grad_x_hat_sum = dec_inputs.sum(0)
        grad_z = scale * P
        if g_x_hat is not None:
            grad_z = grad_z + gather_dot(g_x_hat, W_dec, indices)
        if g_z is not None:
            grad_z = grad_z + g_z

        grad_gate = None
        if gate is not None and needs_gate:
            grad_gate = grad_z * values.clamp_min(0)
            grad_gate = grad_gate.sum(1) if gate.ndim == 1 else grad_gate
        grad_v = grad_z * (values > 0)
        if gate is not None:
            grad_v = grad_v * _per_entry(gate)
        W_enc = W_enc.detach()
        grad_dec = weight_grad(dec_weights, indices, dec_inputs, width, ctx.sparse_grad)[0] if needs_dec else None
        # Σ_tj ∂L/∂v_tj W_enc[i_tj] (for ∂L/∂b) comes with W_enc's gradient, from the per-row sums
        grad_enc, encoder_sum = encoder_grads(grad_v, indices, centred, W_enc, ctx.sparse_grad, needs_enc, needs_b)
        grad_x = grad_b = None
        if needs_x:
            grad_x = F.embedding_bag(indices, W_enc, per_sample_weights=grad_v, mode="sum") - scale * residual
        if needs_b:
            grad_b = grad_x_hat_sum - encoder_sum
        return grad_x, grad_b, grad_enc, grad_dec, grad_gate, None, None, None, None, None, None, None, None
