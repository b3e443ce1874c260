"""Gated SAE (Rajamanoharan et al., 2024): separate "which latents" and "how much" paths."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from switchsae.config import SAEConfig
from switchsae.saes.base import Latents, SAEOutput
from switchsae.saes.dense import DenseEncoderSAE


class GatedSAE(DenseEncoderSAE):
    """Gate and magnitude paths sharing one encoder matrix, SPEC §1::

        u     = W_gate (x − b_pre)                         one dense matmul, W_gate ≡ W_enc
        π     = u + b_gate                                 gate pre-activation, b_gate ≡ b_enc
        W_mag = exp(r_mag) ⊙ W_gate                        rows scaled: W_mag (x − b_pre) = exp(r_mag) ⊙ u
        z     = 1[π > 0] ⊙ ReLU(exp(r_mag) ⊙ u + b_mag)
        x̂     = W_dec z + b_pre

    Loss, with ``λ = cfg.l1_coeff`` and ``sg`` the stop-gradient::

        L = (1/T) Σ_t [ ‖x_t − x̂_t‖² + λ ‖ReLU(π_t)‖₁ + ‖x_t − (sg(W_dec) ReLU(π_t) + sg(b_pre))‖² ]

    The gate's Heaviside passes no gradient, so the gate is trained by the L1 term and the
    auxiliary reconstruction only, the magnitudes by the reconstruction only. As in the paper,
    decoder rows are kept at unit norm, which makes the plain L1 equal to the decoder-norm
    weighted one. Init: ``W_gate = W_decᵀ``, ``b_gate = r_mag = b_mag = 0``.
    Parameters ``2Md + 3M + d``.
    """

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.r_mag = nn.Parameter(torch.zeros(cfg.width))
        self.b_mag = nn.Parameter(torch.zeros(cfg.width))
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        super().reset_parameters(generator)
        with torch.no_grad():
            self.r_mag.zero_()
            self.b_mag.zero_()

    def _encode(self, x: Tensor) -> tuple[Latents, dict[str, Tensor]]:
        u = self.project(x)
        gate = u + self.b_enc
        magnitude = torch.relu(self.r_mag.exp() * u + self.b_mag)
        return Latents((gate > 0) * magnitude), {"gate_relu": gate.relu()}

    def extra_losses(self, x: Tensor, out: SAEOutput) -> dict[str, Tensor]:
        """``"l1": λ (1/T) Σ ‖ReLU(π)‖₁`` and ``"aux_recon"`` through the frozen decoder."""
        gate_relu = out.extras["gate_relu"]
        x_frozen = gate_relu @ self.W_dec.detach() + self.b_pre.detach()
        return {
            "l1": self.cfg.l1_coeff * gate_relu.sum(-1).mean(),
            "aux_recon": (x.float() * self.cfg.act_scale - x_frozen).pow(2).sum(-1).mean(),
        }

    def flops(self) -> dict[str, int]:
        """Forward ``4dM`` as for any dense SAE (the magnitude path reuses the gate's matmul).

        Training adds the auxiliary reconstruction: a second dense decoder matmul, ``2dM``
        forward, whose backward reaches only its input (the decoder is frozen there), another
        ``2dM``. So ``train = 12dM + 4dM = 16dM``.
        """
        costs = super().flops()
        costs["train"] += 4 * self.cfg.d_model * self.cfg.width
        return costs
