"""Adam for SAE dictionaries: row-sparse ("lazy") updates, and unit-norm decoder rows kept in the
same pass (SPEC §7).

Dense Adam reads and writes ~28 bytes per parameter per step whatever the batch touched; at
``M = 524,288``, ``d = 576`` that alone caps training near 1.7k tokens/s on this CPU. With
row-sparse gradients (``sae.sparse_grads``) only the latents the batch used have a gradient row,
and this optimizer updates only those rows and their moments:

    m_r ← β1 m_r + (1 − β1) g_r,   v_r ← β2 v_r + (1 − β2) g_r²
    θ_r ← θ_r − lr · (m_r / (1 − β1^t)) / (sqrt(v_r / (1 − β2^t)) + ε)

for touched rows ``r`` only, with ``t`` the global step (TensorFlow's LazyAdam). Untouched rows
keep their moments and parameters: unlike dense Adam, stale momentum does not keep moving
latents that did not fire. Dense gradients get the ordinary Adam update of every row.

A parameter group with ``unit_norm_rows=True`` holds decoder matrices whose rows stay on the unit
sphere (SPEC §1): each updated row's gradient loses its component along the row first,
``g_r ← g_r − (g_r · θ_r) θ_r``, and the row is renormalised after the update,
``θ_r ← θ_r / ‖θ_r‖``. On CPU the compiled kernel does projection, Adam and renormalisation
while the row is in cache (one pass instead of three). A group may also carry a
``low_precision_copy`` (:class:`BFloat16Copy`, the bf16 encoder weights of a bf16 selection):
the rows the step updates are rewritten in it, so it never needs a cast of the whole matrix.
State names match ``torch.optim.Adam``'s.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.adam import adam

from switchsae.kernels import native


class BFloat16Copy:
    """A bf16 copy of a weight matrix (for a bf16 selection matmul), kept current by the
    optimizer's row updates instead of a cast of the whole matrix every step (at a million latents
    that cast moves ~3.6 GB per step).

    The copy is valid while the weight's version counter and storage are the ones recorded with
    it: any change to the weight that did not also update the copy (loading, an in-place edit, an
    optimizer without it, a move to another device) changes one of them, and the next :meth:`get`
    casts the whole weight again.
    """

    def __init__(self, weight: Tensor):
        self.weight = weight
        self.copy: Tensor | None = None
        self.version, self.source = -1, 0

    def get(self) -> Tensor:
        """The copy, cast afresh if the weight changed behind its back."""
        if self.copy is None or not self.current():
            self.copy = self.weight.detach().to(torch.bfloat16)
            self.mark_current()
        return self.copy

    def current(self) -> bool:
        """Whether the copy matches the weight (same version counter, same storage)."""
        return self.copy is not None and (self.version, self.source) == (self.weight._version, self.weight.data_ptr())

    def mark_current(self) -> None:
        """Record that the copy matches the weight as it is now (after updating both)."""
        self.version, self.source = self.weight._version, self.weight.data_ptr()

    def rows_updated(self, rows: Tensor | None) -> None:
        """Rewrite ``rows`` (all if None) from the weight after an update that was not ours."""
        assert self.copy is not None, "rows_updated needs a copy to update (get() makes it)"
        with torch.no_grad():
            if rows is None:
                self.copy.copy_(self.weight)
            else:
                self.copy.index_copy_(0, rows, self.weight.index_select(0, rows).to(torch.bfloat16))
        self.mark_current()


class LazyAdam(torch.optim.Optimizer):
    """Adam that updates only the rows named by a row-sparse gradient (dense gradients: all rows),
    keeping the rows of ``unit_norm_rows`` groups at unit norm."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "unit_norm_rows": False})

    @torch.no_grad()
    def step(self, closure=None) -> None:  # type: ignore[override]  # no closure: Optimizer's overloads allow one
        for group in self.param_groups:
            unit_norm = group.get("unit_norm_rows", False)
            if unit_norm and any(p.ndim != 2 for p in group["params"]):
                raise ValueError("unit_norm_rows groups must hold matrices (one decoder vector per row)")
            low_copy = group.get("low_precision_copy")
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(step=torch.zeros(()), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                rows, grad = _row_sparse(p.grad) if p.grad.is_sparse else (None, p.grad)
                full = (p, state["exp_avg"], state["exp_avg_sq"])
                # a copy that was current before the step is kept current; a stale one is left to its next get()
                copy = low_copy if low_copy is not None and low_copy.weight is p and low_copy.current() else None
                if p.ndim == 2 and native.usable(*full, grad) and all(t.is_contiguous() for t in full):
                    state["step"] += 1
                    native.adam_rows(*full, grad, rows, lr=group["lr"], beta1=group["betas"][0],
                                     beta2=group["betas"][1], eps=group["eps"], step=int(state["step"]),
                                     unit_norm=unit_norm, low=None if copy is None else copy.copy)
                    if copy is not None:
                        copy.mark_current()
                else:
                    _torch_step(full, grad, rows, state["step"], group, unit_norm)
                    if copy is not None:
                        copy.rows_updated(rows)


def _torch_step(full: tuple[Tensor, Tensor, Tensor], grad: Tensor, rows: Tensor | None, step: Tensor, group: dict,
                unit_norm: bool) -> None:
    """The same update with torch ops (GPU, or no compiled kernels): gather the rows, project,
    torch's fused Adam (it advances ``step``), renormalise, scatter back."""
    param, exp_avg, exp_avg_sq = full if rows is None else (t.index_select(0, rows) for t in full)
    if unit_norm:
        grad = grad - torch.einsum("rd,rd->r", grad, param)[:, None] * param
    adam([param], [grad], [exp_avg], [exp_avg_sq], [], [step], fused=True, amsgrad=False, beta1=group["betas"][0],
         beta2=group["betas"][1], lr=group["lr"], weight_decay=0.0, eps=group["eps"], maximize=False)
    if unit_norm:
        param.div_(param.norm(dim=1, keepdim=True).clamp_min(1e-12))
    if rows is not None:
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
