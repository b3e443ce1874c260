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
A group's ``grad_scale`` (1 if absent) multiplies its gradients inside the update, which is how a
clipped gradient norm (:func:`clip_scale`) costs no extra pass over the gradients.
State names match ``torch.optim.Adam``'s.

**bf16 moments** (``moments="bf16"``, ``--adam-moments bf16``): ``exp_avg`` and ``exp_avg_sq`` of
every matrix (``W_enc``, ``W_dec``, the router's ``W_r``) are stored as bfloat16, 2 + 2 instead of
4 + 4 bytes per parameter; vectors (biases) keep fp32 moments, they are a negligible share. The
arithmetic stays fp32: each moment is read as fp32, updated, used for the step, and only then
stored, with **stochastic rounding**. Round-to-nearest would freeze the second moment: bf16 keeps
8 significant bits, so it drops any change below half an ulp, at least ``2^-9 v ≈ 0.002 v``, and
with ``β2 = 0.999`` the update ``v ← v + (1 − β2)(g² − v)`` changes ``v`` by ``1e-3 (g² − v)``:
the decay ``β2 v`` always rounds back to ``v`` (``v`` never falls), and it rises only where
``g² > 3 v``. Stochastic rounding rounds ``x`` up to the next bf16 value ``b⁺`` with probability
``(x − b⁻) / (b⁺ − b⁻)``, so ``E[round(x)] = x``: the moments follow fp32 Adam's recursion in
expectation, with a zero-mean error below one ulp (``2^-7`` relative) per step. The noise is no
generator's state but a hash (splitmix64's finaliser) of ``(step, flat element index, moment)``:
the same step on the same state gives the same bits (a resume is bit-identical), whatever the
thread count, and the compiled kernel and :func:`_torch_step` give identical bits on CPU (without
``unit_norm``, whose sums the two paths add in different orders). Where a process holds only some
rows of a matrix (an expert-parallel rank), ``key_rows`` names each row's index in the whole
matrix, so every row is rounded as in one process.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.adam import adam

from switchsae.config import ADAM_MOMENTS
from switchsae.kernels import native

#: ``moments`` settings → the dtype a matrix's Adam moments are stored in (vectors keep fp32)
MOMENT_DTYPES = dict(zip(ADAM_MOMENTS, (torch.float32, torch.bfloat16), strict=True))


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
    keeping the rows of ``unit_norm_rows`` groups at unit norm; ``moments="bf16"`` stores the
    moments of matrices in bf16 (module docstring)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 moments: str = "fp32", key_rows: dict[Tensor, Tensor] | None = None):
        """``key_rows[p]``: for each row of matrix ``p``, its row in the whole matrix (the key of its
        moments' rounding noise) where ``p`` holds only some of them; unnamed matrices are whole."""
        if moments not in MOMENT_DTYPES:
            raise ValueError(f"moments must be one of {', '.join(MOMENT_DTYPES)}, got {moments!r}.")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "unit_norm_rows": False, "moments": moments})
        self.key_rows = key_rows or {}

    def moment_dtype(self, p: Tensor) -> torch.dtype:
        """The dtype of ``p``'s moments: bf16 for a matrix in a ``moments="bf16"`` group, else fp32."""
        group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
        return MOMENT_DTYPES[group["moments"]] if p.ndim == 2 else torch.float32

    def check_moment(self, p: Tensor, name: str, moment: Tensor) -> None:
        """ValueError, naming the setting, if a moment loaded for ``p`` (parameter ``name``) is not
        in the dtype this optimizer keeps it in."""
        want = self.moment_dtype(p)
        if moment.dtype != want:
            setting = {dtype: key for key, dtype in MOMENT_DTYPES.items()}
            raise ValueError(f"the Adam moments of {name} are {setting[moment.dtype]}, but this run keeps them "
                             f"{setting[want]} (adam_moments); resume with adam_moments={setting[moment.dtype]}")

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
                    dtype = self.moment_dtype(p)
                    state.update(step=torch.zeros(()), exp_avg=torch.zeros_like(p, dtype=dtype),
                                 exp_avg_sq=torch.zeros_like(p, dtype=dtype))
                rows, grad = _row_sparse(p.grad) if p.grad.is_sparse else (None, p.grad)
                full = (p, state["exp_avg"], state["exp_avg_sq"])
                # a copy that was current before the step is kept current; a stale one is left to its next get()
                copy = low_copy if low_copy is not None and low_copy.weight is p and low_copy.current() else None
                if (p.ndim == 2 and native.usable(*full, grad, dtypes=(torch.float32, torch.bfloat16))
                        and all(t.is_contiguous() for t in full)):
                    state["step"] += 1
                    native.adam_rows(*full, grad, rows, lr=group["lr"], beta1=group["betas"][0],
                                     beta2=group["betas"][1], eps=group["eps"], step=int(state["step"]),
                                     unit_norm=unit_norm, low=None if copy is None else copy.copy,
                                     key_rows=self.key_rows.get(p), grad_scale=float(group.get("grad_scale", 1.0)))
                    if copy is not None:
                        copy.mark_current()
                else:
                    _torch_step(full, grad, rows, state["step"], group, unit_norm, self.key_rows.get(p))
                    if copy is not None:
                        copy.rows_updated(rows)


def _torch_step(full: tuple[Tensor, Tensor, Tensor], grad: Tensor, rows: Tensor | None, step: Tensor, group: dict,
                unit_norm: bool, key_rows: Tensor | None = None) -> None:
    """The same update with torch ops (GPU, or no compiled kernels): gather the rows, project,
    scale (``group["grad_scale"]``), torch's fused Adam (it advances ``step``; bf16 moments: :func:`_adam_bf16_moments`, row ``r``
    keyed as row ``key_rows[r]``), renormalise, scatter back."""
    param, exp_avg, exp_avg_sq = full if rows is None else (t.index_select(0, rows) for t in full)
    if unit_norm:
        grad = grad - torch.einsum("rd,rd->r", grad, param)[:, None] * param
    scale = group.get("grad_scale", 1.0)
    if isinstance(scale, Tensor) or scale != 1.0:  # a clip factor stays a tensor: no device sync to test it
        grad = grad * scale
    if exp_avg.dtype == torch.bfloat16:
        step += 1
        index = torch.arange(full[0].shape[0], device=param.device) if key_rows is None else key_rows.to(param.device)
        index = index if rows is None else index[rows]
        _adam_bf16_moments(param, exp_avg, exp_avg_sq, grad, index[:, None] * param.shape[1]
                           + torch.arange(param.shape[1], device=param.device), int(step), group)
    else:
        adam([param], [grad], [exp_avg], [exp_avg_sq], [], [step], fused=True, amsgrad=False, beta1=group["betas"][0],
             beta2=group["betas"][1], lr=group["lr"], weight_decay=0.0, eps=group["eps"], maximize=False)
    if unit_norm:
        param.div_(param.norm(dim=1, keepdim=True).clamp_min(1e-12))
    if rows is not None:
        for target, part in zip(full, (param, exp_avg, exp_avg_sq)):
            target.index_copy_(0, rows, part)


def _f32(value: float) -> float:
    """``value`` rounded to the nearest fp32 number (as the C kernel receives its float arguments)."""
    return torch.tensor(value, dtype=torch.float32).item()


def _adam_bf16_moments(param: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, grad: Tensor, index: Tensor, step: int,
                       group: dict) -> None:
    """Adam step ``step`` in place on fp32 ``param`` with bf16 moments, in the compiled kernel's
    fp32 arithmetic, operation for operation (every product and sum rounded on its own):

        m ← β1 m + (1 − β1) g,  v ← β2 v + ((1 − β2) g) g,  θ ← θ − (s m) / (sqrt(v) / sqrt(c2) + ε)

    with ``s = lr / c1``, ``c1 = 1 − β1^t``, ``c2 = 1 − β2^t``; then the moments are stored with
    :func:`stochastic_round_bf16`, keyed ``rounding_keys(step, index, 0)`` for ``m`` and
    ``rounding_keys(step, index, 1)`` for ``v`` (``index``: each element's flat index in the full matrix)."""
    beta1, beta2 = group["betas"]
    m = exp_avg.float() * _f32(beta1) + grad * _f32(1 - _f32(beta1))
    v = exp_avg_sq.float() * _f32(beta2) + grad * _f32(1 - _f32(beta2)) * grad
    step_size = _f32(_f32(group["lr"]) / _f32(1 - beta1 ** step))
    root = v.double().sqrt().float()  # correctly rounded, as C's sqrtf (torch's fp32 sqrt on CPU is not always)
    param.sub_(m * step_size / (root / _f32((1 - beta2 ** step) ** 0.5) + _f32(group["eps"])))
    exp_avg.copy_(stochastic_round_bf16(m, rounding_keys(step, index, 0)))
    exp_avg_sq.copy_(stochastic_round_bf16(v, rounding_keys(step, index, 1)))


#: splitmix64's finaliser constants, as the int64 values of their 64 bits
_MIX = (0xBF58476D1CE4E5B9 - 2**64, 0x94D049BB133111EB - 2**64)


def _shift_right(z: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 words (torch's ``>>`` is arithmetic)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def mix64(z: Tensor) -> Tensor:
    """splitmix64's finaliser on int64 words (wrapping arithmetic on their 64 bits), as ``mix64`` in native.c:
    ``z ← (z ⊕ z≫30)·c1,  z ← (z ⊕ z≫27)·c2,  z ⊕ z≫31``."""
    z = (z ^ _shift_right(z, 30)) * _MIX[0]
    z = (z ^ _shift_right(z, 27)) * _MIX[1]
    return z ^ _shift_right(z, 31)


def rounding_keys(step: int, index: Tensor, moment: int) -> Tensor:
    """The stochastic-rounding keys of moment ``moment`` (0: ``exp_avg``, 1: ``exp_avg_sq``) of the
    elements at flat indices ``index`` in step ``step``: ``mix64(step) + 2·index + moment`` (mod 2^64)."""
    return mix64(torch.tensor(step, dtype=torch.int64, device=index.device)) + 2 * index + moment


def stochastic_round_bf16(values: Tensor, keys: Tensor) -> Tensor:
    """fp32 ``values`` → bf16, each rounded up or down at random so that the mean is the value:
    the 16 bits bf16 drops are added to uniform 16-bit noise ``u = mix64(key) ≫ 48`` and the sum is
    truncated, so ``|x|`` rounds up with probability (dropped bits) / 2^16 and ``E[round(x)] = x``
    (sign-magnitude: negative values alike). Bit for bit ``float_to_bf16_stochastic`` in native.c
    (NaN stays a NaN)."""
    noise = _shift_right(mix64(keys), 48).to(torch.int32)
    rounded = ((values.view(torch.int32) + noise) >> 16).to(torch.int16).view(torch.bfloat16)
    return torch.where(values.isnan(), torch.tensor(float("nan"), dtype=torch.bfloat16, device=values.device), rounded)


def squared_norm(grad: Tensor, rows: slice = slice(None)) -> Tensor:
    """``Σ g²`` over the rows ``rows`` of a dense or row-sparse gradient, as an fp32 scalar."""
    if not grad.is_sparse:
        return torch.linalg.vector_norm(grad[rows], dtype=torch.float32).square()
    ids, values = _row_sparse(grad)
    start, stop = rows.start or 0, grad.shape[0] if rows.stop is None else rows.stop
    if start > 0 or stop < grad.shape[0]:
        values = values[(ids >= start) & (ids < stop)]
    return torch.linalg.vector_norm(values, dtype=torch.float32).square()


def clip_scale(max_norm: float, norm: Tensor) -> Tensor:
    """The factor ``min(1, c / (‖g‖ + 1e-6))`` that clips a gradient of global norm ``‖g‖ = norm``
    to ``c = max_norm`` (torch's ``clip_grad_norm_`` rule). :class:`LazyAdam` applies it inside its
    update as a group's ``grad_scale`` rather than by rewriting every gradient first."""
    return (max_norm / (norm + 1e-6)).clamp(max=1.0)


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
