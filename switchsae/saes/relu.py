"""ReLU SAE with a decoder-norm-weighted L1 penalty (Anthropic, April 2024 update)."""
from __future__ import annotations

from torch import Tensor

from switchsae.config import SAEConfig
from switchsae.saes.base import Latents, SAEOutput
from switchsae.saes.dense import DenseEncoderSAE


class ReLUSAE(DenseEncoderSAE):
    """``z = ReLU(W_enc (x − b_pre) + b_enc)``, ``x̂ = W_dec z + b_pre``, SPEC §1::

        L = (1/T) Σ_t ‖x_t − x̂_t‖² + λ (1/T) Σ_t Σ_j z_tj ‖W_dec[j]‖        λ = cfg.l1_coeff

    The decoder is unconstrained (no unit-norm projection): weighting each latent's L1 by its
    decoder norm stops the model from shrinking ``z`` and growing ``W_dec`` to dodge the penalty.
    Init as in the update: decoder rows random directions of norm 0.1 (small norms start the
    latents near the penalty's scale; the update reports 0.05 to 1 working), ``W_enc = W_decᵀ``,
    ``b_enc = 0``. Parameters ``2Md + M + d``. FLOPs: see :meth:`DenseEncoderSAE.flops`.
    """

    unit_norm_decoder = False
    decoder_init_norm = 0.1

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.reset_parameters()

    def _encode(self, x: Tensor) -> tuple[Latents, dict[str, Tensor]]:
        return Latents(self.pre_activations(x).relu()), {}

    def extra_losses(self, x: Tensor, out: SAEOutput) -> dict[str, Tensor]:
        """``"l1": λ (1/T) Σ_t Σ_j z_tj ‖W_dec[j]‖``."""
        penalty = out.latents.values @ self.W_dec.norm(dim=1)
        return {"l1": self.cfg.l1_coeff * penalty.mean()}
