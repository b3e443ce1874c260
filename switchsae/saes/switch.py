"""Switch SAE (Mudide et al., 2024): N small TopK experts behind a trained router."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from switchsae.config import SAEConfig
from switchsae.kernels.core import sparse_core
from switchsae.kernels.dispatch import grouped_select_topk, sort_by_expert
from switchsae.kernels.sparse import topk_encode
from switchsae.saes.base import Latents, SAEOutput, SparseAutoencoder
from switchsae.saes.geometric_median import geometric_median


class SwitchSAE(SparseAutoencoder):
    """Top-1 routed mixture of bias-free TopK experts, SPEC §1::

        p(x) = softmax(W_r (x − b_r))                       router, W_r: N×d
        i*   = argmax_i p_i(x)
        x̂    = p_{i*}(x) · W_dec^{i*} TopK(W_enc^{i*} (x − b_pre)) + b_pre

    Each expert has ``m = M/N`` latents; expert ``i`` owns rows ``[i·m, (i+1)·m)`` of the stacked
    ``W_enc, W_dec: [M, d]``, so codes use global latent ids. The router probability is folded
    into the code (``z ← p_{i*} z``), which is what makes the router differentiable and lets the
    shared decoder path serve. Load balancing (Fedus et al.): ``L_aux = N Σ_i f_i P_i`` with
    ``f_i`` the fraction of tokens routed to ``i`` (no gradient) and ``P_i`` the mean router
    probability (gradient); the loss adds ``α L_aux``. Parameters ``Nd + d + 2Md + d``.
    """

    specific_settings = frozenset({"k", "n_experts", "aux_coeff", "matmul_dtype", "sparse_updates"})

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.W_enc = nn.Parameter(torch.empty(cfg.width, cfg.d_model))
        self.W_router = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_model))
        self.b_router = nn.Parameter(torch.zeros(cfg.d_model))
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        super().reset_parameters(generator)
        bound = 1 / math.sqrt(self.cfg.d_model)
        with torch.no_grad():
            self.W_enc.copy_(self.W_dec)
            self.W_router.copy_((torch.rand(self.W_router.shape, generator=generator) * 2 - 1) * bound)
            self.b_router.zero_()

    def init_from_data(self, x: Tensor) -> None:
        """``b_pre`` and ``b_r`` both start at the geometric median (separate parameters)."""
        with torch.no_grad():
            median = geometric_median(x.float() * self.cfg.act_scale)
            self.b_pre.copy_(median)
            self.b_router.copy_(median)

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Router probabilities ``p: [T, N]`` and the chosen expert ``i*: [T]`` (normalised ``x``).

        ``W_r (x − b_r)`` is computed as ``W_r x − W_r b_r``: the bias gradient is then a sum of
        ``[T, N]`` logit gradients, not a ``[T, d]`` pass (3x faster router fwd + bwd here).
        """
        probs = torch.softmax(x @ self.W_router.t() - self.W_router @ self.b_router, dim=-1)
        return probs, probs.argmax(dim=-1)

    def forward(self, x: Tensor) -> SAEOutput:
        """Encode, decode and the squared error in expert-sorted token order (kernels/dispatch.py,
        kernels/core.py); outputs in token order."""
        latents, x_hat, mse, extras = self._sorted_forward(self._check_input(x), decode=True)
        return SAEOutput(x_hat, latents, extras, mse)

    def _encode(self, x: Tensor) -> tuple[Latents, dict[str, Tensor]]:
        latents, _, _, extras = self._sorted_forward(x, decode=False)
        return latents, extras

    def _sorted_forward(self, x: Tensor, decode: bool) -> tuple[Latents, Tensor | None, Tensor | None, dict[str, Tensor]]:
        """The code of normalised ``x`` (and with ``decode`` the reconstruction in raw units and the
        squared error), computed on the tokens grouped by expert and put back in token order."""
        probs, expert = self.route(x)
        order, counts = sort_by_expert(expert, self.cfg.n_experts)
        x_sorted = x.index_select(0, order)
        with torch.no_grad():
            centred = x_sorted - self.b_pre
        values, indices = grouped_select_topk(centred, self.W_enc, counts, self.cfg.k, self.selection_weights())
        gate = probs.gather(1, expert[:, None]).squeeze(1).index_select(0, order)
        unsorted = torch.empty_like(order).index_copy_(0, order, torch.arange(order.numel(), device=order.device))
        x_hat = mse = None
        if decode:  # x̂ comes out in token order and raw units
            z, x_hat, mse = sparse_core(x_sorted, self.b_pre, self.W_enc, self.W_dec, indices, values, centred, gate,
                                        self.sparse_grads, x_hat_rows=order, x_hat_scale=1 / self.cfg.act_scale)
        else:
            z = topk_encode(x_sorted, self.b_pre, self.W_enc, indices, values, self.sparse_grads, centred) * gate[:, None]
        latents = Latents(z.index_select(0, unsorted), indices.index_select(0, unsorted))
        return latents, x_hat, mse, {"router_probs": probs, "expert": expert}

    def extra_losses(self, x: Tensor, out: SAEOutput) -> dict[str, Tensor]:
        probs, expert = out.extras["router_probs"], out.extras["expert"]
        return {"balance": self.cfg.aux_coeff * load_balance_loss(probs, expert)}

    def flops(self) -> dict[str, int]:
        """Forward ``2dN`` (router) ``+ 2dM/N`` (one expert's encoder) ``+ 2kd`` (sparse decoder).

        Training: the router's matmul costs 3x its forward (it is dense), the expert selection
        matmul has no backward, and the sparse parts cost ``12kd`` as for TopK.
        """
        d, M, k, N = self.cfg.d_model, self.cfg.width, self.cfg.k, self.cfg.n_experts
        encoder = 2 * d * M // N
        return {"forward": 2 * d * N + encoder + 2 * k * d, "train": 6 * d * N + encoder + 12 * k * d}


def load_balance_loss(probs: Tensor, expert: Tensor) -> Tensor:
    """``N Σ_i f_i P_i``: 1 for a uniform router, larger the more tokens pile onto likely experts."""
    n_experts = probs.shape[1]
    f = torch.bincount(expert, minlength=n_experts).to(probs.dtype) / expert.shape[0]
    return n_experts * (f * probs.mean(0)).sum()
