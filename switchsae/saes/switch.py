"""Switch SAE (Mudide et al., 2024): N small TopK experts behind a trained router."""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn

from switchsae.config import ROUTING_FIELDS, SAEConfig
from switchsae.kernels.core import sparse_core
from switchsae.kernels.dispatch import combine, dispatch, grouped_select_topk
from switchsae.kernels.sparse import topk_encode
from switchsae.saes.base import Latents, SAEOutput, SparseAutoencoder
from switchsae.saes.geometric_median import geometric_median
from switchsae.saes.routing import ROUTER_CLASSES, Assignment, build_router, forced, with_shared_expert


class SwitchSAE(SparseAutoencoder):
    """Routed mixture of bias-free TopK experts, SPEC §1 (top-1 routing, the paper's)::

        p(x) = softmax(W_r (x − b_r))                       router, W_r: N×d
        i*   = argmax_i p_i(x)
        x̂    = p_{i*}(x) · W_dec^{i*} TopK(W_enc^{i*} (x − b_pre)) + b_pre

    Each expert has ``m = M/N`` latents; expert ``i`` owns rows ``[i·m, (i+1)·m)`` of the stacked
    ``W_enc, W_dec: [M, d]``, so codes use global latent ids. The router's gate is folded into
    the code (``z ← p_{i*} z``), which is what makes the router differentiable and lets the shared
    decoder path serve. The router is a strategy (``cfg.routing``, saes/routing.py) returning an
    :class:`Assignment` of (token, expert, gate) entries; with several entries per token (top-e, a
    shared expert, expert choice) the code is one TopK over the union of the token's experts'
    latents, each latent scaled by its own expert's gate:
    ``x̂ = Σ_{j ∈ TopK(∪_e W_enc^e (x − b_pre))} g_{e(j)} z_j W_dec[j] + b_pre``. A shared expert
    is one more block of ``m`` latents (``M = (N + 1)·m``) with gate 1. Parameters
    ``Nd + d + 2Md + d``.
    """

    specific_settings = frozenset({"k", "n_experts", *ROUTING_FIELDS, "auxk_coeff", "auxk_k", "dead_tokens",
                                   "matmul_dtype", "sparse_updates"})

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.W_enc = nn.Parameter(torch.empty(cfg.width, cfg.d_model))
        self.W_router = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_model))
        self.b_router = nn.Parameter(torch.zeros(cfg.d_model))
        self.router = build_router(cfg.routing, cfg.n_experts)
        #: with experts split across ranks, the exchange that runs them (switchsae.distributed.expert_parallel)
        self.expert_parallel = None
        self.reset_parameters()

    @classmethod
    def token_ids_needed(cls, cfg: SAEConfig) -> bool:
        return ROUTER_CLASSES[cfg.routing.router].needs_token_ids

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

    def router_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``ℓ = W_r (x − b_r)`` and ``p = softmax(ℓ)``, ``[T, N]``, for normalised ``x``.

        ``W_r (x − b_r)`` is computed as ``W_r x − W_r b_r``: the bias gradient is then a sum of
        ``[T, N]`` logit gradients, not a ``[T, d]`` pass.
        """
        logits = x @ self.W_router.t() - self.W_router @ self.b_router
        return logits, torch.softmax(logits, dim=-1)

    def route(self, x: Tensor, token_ids: Tensor | None = None, expert: int | None = None) -> Assignment:
        """The :class:`Assignment` of normalised ``x``; with ``expert`` every token goes to that
        expert (steering), gated by its own top router probability ``max_i p_i`` (1 without a
        learned router)."""
        logits = probs = None
        self.router.batch_group = self.batch_group  # a batch-wide strategy balances over every rank's shard
        if self.router.learned:
            logits, probs = self.router_logits(x)
        if expert is None:
            assignment = self.router.assign(logits, probs, token_ids, self.training)
        else:
            if not 0 <= expert < self.cfg.n_experts:
                raise ValueError(f"expert {expert} is out of range: this SAE has experts 0..{self.cfg.n_experts - 1}.")
            assignment = forced(probs, x.shape[0], expert, self.cfg.n_experts, x.device)
        if self.cfg.routing.shared_expert:
            assignment = with_shared_expert(assignment, self.cfg.n_experts)
        return assignment

    def forward(self, x: Tensor, token_ids: Tensor | None = None, expert: int | None = None) -> SAEOutput:
        """Route, then encode, decode and the squared error (kernels/dispatch.py, kernels/core.py);
        outputs in token order. ``expert`` forces every token to one expert (see :meth:`route`)."""
        x = self._check_input(x)
        assignment = self.route(x, token_ids, expert)
        extras: dict = {"assignment": assignment}
        if self.expert_parallel is not None:  # the rows at their owners are kept for AuxK
            latents, x_hat, mse, extras["dispatched"] = self.expert_parallel.forward(self, x, assignment, decode=True)
        else:
            latents, x_hat, mse = self._expert_forward(x, assignment, decode=True)
        assert x_hat is not None  # decode=True reconstructs
        return SAEOutput(x_hat, latents, extras, mse)

    def encode(self, x: Tensor, token_ids: Tensor | None = None, expert: int | None = None) -> Latents:
        """The code of raw activations ``x: [T, d]`` (``token_ids`` for hash routing; ``expert`` forces one)."""
        x = self._check_input(x)
        return self._expert_forward(x, self.route(x, token_ids, expert), decode=False)[0]

    def _expert_forward(self, x: Tensor, a: Assignment, decode: bool) -> tuple[Latents, Tensor | None, Tensor | None]:
        """Dispatch → each entry's TopK within its expert → combine; with ``decode`` also the
        reconstruction (raw units, token order) and the squared error of normalised ``x``. With
        experts split across ranks (``expert_parallel``) the entries travel to their experts' ranks."""
        x_hat: Tensor | None
        mse: Tensor | None
        if self.expert_parallel is not None:
            return self.expert_parallel.forward(self, x, a, decode)[:3]
        x_entries = dispatch(x, a.token)
        if not a.one_per_token:  # one TopK over the union of each token's entries, in token order
            values, indices, _ = self.select_candidates(x_entries, a.counts)
            values, indices, gate = combine(values, indices, a.gate, a.token, a.n_tokens, self.cfg.k)
            with torch.no_grad():
                centred = x - self.b_pre
            if not decode:
                return Latents(topk_encode(x, self.b_pre, self.W_enc, indices, values, self.sparse_grads, centred)
                               * gate, indices), None, None
            z, x_hat, mse = sparse_core(x, self.b_pre, self.W_enc, self.W_dec, indices, values, centred, gate,
                                        self.sparse_grads, x_hat_scale=1 / self.cfg.act_scale)
            return Latents(z, indices), x_hat, mse
        # one entry per token: the whole forward (and backward) runs in expert order
        z, indices, x_hat, mse = self.expert_compute(x_entries, a.gate, a.counts, decode, x_hat_rows=a.token)
        unsorted = torch.empty_like(a.token).index_copy_(0, a.token, torch.arange(a.token.numel(), device=x.device))
        return Latents(z.index_select(0, unsorted), indices.index_select(0, unsorted)), x_hat, mse

    def select_candidates(self, x_entries: Tensor, counts: list[int]) -> tuple[Tensor, Tensor, Tensor]:
        """Each entry's ``k`` largest pre-activations within its block (no grad): ``(values, indices,
        x_entries − b_pre)``; ``counts[b]`` entries for each block of the ``W_enc`` held here."""
        with torch.no_grad():
            centred = x_entries - self.b_pre
        values, indices = grouped_select_topk(centred, self.W_enc, counts, self.cfg.k, self.selection_weights())
        return values, indices, centred

    def expert_compute(self, x_entries: Tensor, gate: Tensor, counts: list[int], decode: bool,
                       x_hat_rows: Tensor | None = None, mse_tokens: int | None = None,
                       ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """The expert compute of one entry per row, rows grouped by block (``counts``): selection,
        then the fused core (kernels/core.py) with each row's gate. Returns ``(z, indices)`` in row
        order (indices into the ``W_enc`` held here) and, with ``decode``, ``x̂`` (raw units, row
        ``t`` at ``x_hat_rows[t]``) and the squared error over ``mse_tokens`` tokens (default: rows)."""
        values, indices, centred = self.select_candidates(x_entries, counts)
        if not decode:
            z = topk_encode(x_entries, self.b_pre, self.W_enc, indices, values, self.sparse_grads, centred) \
                * gate[:, None]
            return z, indices, None, None
        z, x_hat, mse = sparse_core(x_entries, self.b_pre, self.W_enc, self.W_dec, indices, values, centred, gate,
                                    self.sparse_grads, x_hat_rows=x_hat_rows, x_hat_scale=1 / self.cfg.act_scale,
                                    mse_tokens=mse_tokens)
        return z, indices, x_hat, mse

    def extra_losses(self, x: Tensor, out: SAEOutput) -> dict[str, Tensor]:
        """The router's own terms (load balance, z-loss) and, with ``auxk_coeff``, AuxK within
        each token's experts. The load fractions ``f_i`` count the whole batch (every rank's shard)."""
        a = out.extras["assignment"]
        if self.router.balance_loss:
            a = dataclasses.replace(a, counts=self.batch_group.sum_counts(a.counts))
        return {**self.router.aux_losses(a, self.aux_unit()), **self.auxk_terms(x, out)}

    def aux_unit(self) -> float:
        """Factor on the router's loss weights: ``(act_scale / unit_scale)²`` for ``aux_units = data``
        (the loss's MSE is that times the MSE of ``unit_scale · x``, activations at mean norm √d),
        1 for ``loss``."""
        cfg = self.cfg
        return (cfg.act_scale / cfg.unit_scale) ** 2 if cfg.routing.aux_units == "data" else 1.0

    def auxk_term(self, x: Tensor, out: SAEOutput, dead: Tensor) -> Tensor:
        """AuxK within each token's experts; with experts split across ranks, on their owners
        (switchsae.distributed.union)."""
        if self.expert_parallel is None:
            return super().auxk_term(x, out, dead)
        return self.expert_parallel.auxk_loss(self, x, out, dead)

    def auxk_groups(self, out: SAEOutput) -> list[tuple[Tensor, range]]:
        """One group per expert block: the tokens routed there and the block's latents."""
        a, m = out.extras["assignment"], self.cfg.expert_width
        return [(tokens, range(e * m, (e + 1) * m)) for e, tokens in enumerate(a.token.split(a.counts))]

    def batch_stats(self, out: SAEOutput) -> dict[str, float]:
        """Fraction of tokens no expert took (only expert-choice routing leaves any)."""
        return {"unrouted": out.extras["assignment"].unrouted_fraction()}

    def entries_per_token(self) -> float:
        """Expert encoders each token runs through in the forward: ``e`` (top-e), the capacity
        factor (expert choice, in training; 1 at inference), else 1; plus 1 for a shared expert."""
        routing = self.cfg.routing
        routed = {"top_e": routing.experts_per_token,
                  "expert_choice": routing.capacity_factor if self.training else 1}.get(routing.router, 1)
        return routed + int(routing.shared_expert)

    def flops(self) -> dict[str, int]:
        """Forward ``2dN`` (a learned router) ``+ 2d·(M/N)·r`` (the encoders of the ``r`` experts a
        token runs through, :meth:`entries_per_token`) ``+ 2kd`` (sparse decoder).

        Training: the router's matmul costs 3x its forward (it is dense), the expert selection
        matmul has no backward, and the sparse parts cost ``12kd`` as for TopK.
        """
        d, k, N = self.cfg.d_model, self.cfg.k, self.cfg.n_experts
        router = 2 * d * N if self.router.learned else 0
        encoder = round(2 * d * self.cfg.expert_width * self.entries_per_token())
        return {"forward": router + encoder + 2 * k * d, "train": 3 * router + encoder + 12 * k * d}
