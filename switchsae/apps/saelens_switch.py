"""Switch SAEs inside SAELens 6: importing this module registers architecture ``"switch"``, so that
``sae_lens.SAE.load_from_disk(folder)`` loads a folder written by ``switchsae export --format
saelens`` (needs ``sae_lens``; nothing else in switchsae imports this module).

In SAELens's storage (``x @ W``), for ``x`` after SAELens's input hook::

    p     = softmax((x − b_router) W_router)         W_router: [d, N], b_router: [d]
    i*    = argmax_i p_i                             top-1 routing
    pre_i = (x − b_dec) W_enc[:, i·m:(i+1)·m]       only the chosen expert's m = M/N columns
    z     = p_{i*} · ReLU(TopK_k(pre_{i*}))           placed at the expert's latent ids, zero elsewhere
    x̂     = z W_dec + b_dec

Self-contained on purpose: it needs only torch and sae_lens, not switchsae's training code.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from sae_lens import SAE, SAEConfig, register_sae_class
from sae_lens.registry import SAE_CLASS_REGISTRY
from torch import Tensor, nn

ARCHITECTURE = "switch"


@dataclass
class SwitchSAEConfig(SAEConfig):
    """SAELens config of a Switch SAE: ``n_experts`` experts of ``d_sae / n_experts`` latents, ``k``
    active latents per token inside the chosen expert."""

    k: int = 32
    n_experts: int = 1

    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_experts < 1 or self.d_sae % self.n_experts:
            raise ValueError(f"d_sae {self.d_sae} is not divisible by n_experts {self.n_experts}")
        if not 1 <= self.k <= self.d_sae // self.n_experts:
            raise ValueError(f"k={self.k} must lie in [1, {self.d_sae // self.n_experts}] (one expert's width)")


class SwitchSAE(SAE[SwitchSAEConfig]):
    """Top-1 routed mixture of bias-free TopK experts (module docstring), inference only."""

    W_router: nn.Parameter
    b_router: nn.Parameter

    def initialize_weights(self) -> None:
        super().initialize_weights()
        options = dict(dtype=self.dtype, device=self.device)
        self.W_router = nn.Parameter(torch.zeros(self.cfg.d_in, self.cfg.n_experts, **options))
        self.b_router = nn.Parameter(torch.zeros(self.cfg.d_in, **options))

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Router probabilities ``p: [T, N]`` and the chosen expert ``i*: [T]`` of ``x: [T, d]``."""
        probs = torch.softmax((x - self.b_router) @ self.W_router, dim=-1)
        return probs, probs.argmax(dim=-1)

    def encode(self, x: Tensor) -> Tensor:
        """Codes ``[..., d_sae]``; ``hook_sae_acts_pre`` sees the chosen expert's pre-activations,
        zero at the other experts' latents."""
        sae_in = self.process_sae_in(x)
        flat = sae_in.reshape(-1, self.cfg.d_in)
        probs, expert = self.route(flat + self.b_dec * self.cfg.apply_b_dec_to_input)
        n_experts, m = self.cfg.n_experts, self.cfg.d_sae // self.cfg.n_experts
        pre = flat.new_zeros(flat.shape[0], n_experts, m)
        for e in expert.unique().tolist():
            rows = (expert == e).nonzero().squeeze(1)
            pre[rows, e] = flat[rows] @ self.W_enc[:, e * m:(e + 1) * m]
        hidden_pre = self.hook_sae_acts_pre(pre.reshape(*sae_in.shape[:-1], self.cfg.d_sae))
        tokens = torch.arange(flat.shape[0], device=flat.device)
        values, slots = hidden_pre.reshape(-1, n_experts, m)[tokens, expert].topk(self.cfg.k, dim=-1, sorted=False)
        gated = probs.gather(1, expert[:, None]) * values.relu()
        codes = flat.new_zeros(flat.shape[0], self.cfg.d_sae).scatter_(1, expert[:, None] * m + slots, gated)
        return self.hook_sae_acts_post(codes.reshape(hidden_pre.shape))

    def decode(self, feature_acts: Tensor) -> Tensor:
        """``x̂ = z W_dec + b_dec``, then SAELens's output hooks, normalisation and reshaping."""
        sae_out = self.hook_sae_recons(feature_acts @ self.W_dec + self.b_dec)
        return self.reshape_fn_out(self.run_time_activation_norm_fn_out(sae_out), self.d_head)

    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        """Refused: scaling latents by their decoder norms would change which k a TopK keeps."""
        raise NotImplementedError("folding decoder norms would change a Switch SAE's top-k selection")


def register() -> None:
    """Register ``"switch"`` with SAELens (once; importing this module does it)."""
    if ARCHITECTURE not in SAE_CLASS_REGISTRY:
        register_sae_class(ARCHITECTURE, SwitchSAE, SwitchSAEConfig)


register()
