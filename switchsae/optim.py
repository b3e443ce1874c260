"""Row-sparse ("lazy") Adam for dictionaries too large to update densely every step (SPEC §7).

Dense Adam reads and writes ~28 bytes per parameter per step whatever the batch touched; at
``M = 524,288``, ``d = 576`` that alone caps training near 1.7k tokens/s on this CPU. With
row-sparse gradients (``sae.sparse_grads``) only the latents the batch used have a gradient row,
and this optimizer updates only those rows and their moments:

    m_r ← β1 m_r + (1 − β1) g_r,   v_r ← β2 v_r + (1 − β2) g_r²
    θ_r ← θ_r − lr · (m_r / (1 − β1^t)) / (sqrt(v_r / (1 − β2^t)) + ε)

for touched rows ``r`` only, with ``t`` the global step (TensorFlow's LazyAdam). Untouched rows
keep their moments and parameters: unlike dense Adam, stale momentum does not keep moving
latents that did not fire. Dense gradients (biases, the router) get the ordinary Adam update.
State names match ``torch.optim.Adam``'s, so checkpoints are interchangeable.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.adam import adam

from switchsae.kernels import native


class LazyAdam(torch.optim.Optimizer):
    """Adam that updates only the rows named by a row-sparse gradient (dense gradients: all rows)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None) -> None:
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(step=torch.zeros(()), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                full = (p, state["exp_avg"], state["exp_avg_sq"])
                if p.grad.is_sparse:
                    rows, grad = _row_sparse(p.grad)
                    if native.usable(p, grad, rows) and all(t.is_contiguous() for t in full):
                        # one in-place pass over the touched rows (no gather, no scatter back)
                        state["step"] += 1
                        native.adam_rows(*full, grad, rows, lr=group["lr"], beta1=beta1, beta2=beta2,
                                         eps=group["eps"], step=int(state["step"]))
                        continue
                    param, exp_avg, exp_avg_sq = (t.index_select(0, rows) for t in full)
                else:
                    grad, (param, exp_avg, exp_avg_sq) = p.grad, full
                # torch's fused single-pass Adam kernel, on the touched rows only; it advances "step".
                adam([param], [grad], [exp_avg], [exp_avg_sq], [], [state["step"]], fused=True, amsgrad=False,
                     beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=0.0, eps=group["eps"], maximize=False)
                if p.grad.is_sparse:
                    for target, part in zip(full, (param, exp_avg, exp_avg_sq)):
                        target.index_copy_(0, rows, part)


def _row_sparse(grad: Tensor) -> tuple[Tensor, Tensor]:
    """Rows and values of a gradient with one sparse dimension, each row once.

    Autograd drops the coalesced flag our kernels set; strictly increasing row ids prove the
    gradient is coalesced already, which saves a sort of every touched row.
    """
    if grad.sparse_dim() != 1:
        raise ValueError("LazyAdam needs row-sparse gradients (one sparse dimension)")
    rows = grad._indices()[0]
    if not (grad.is_coalesced() or bool((rows[1:] > rows[:-1]).all())):
        grad = grad.coalesce()
        rows = grad._indices()[0]
    return rows, grad._values()
