"""What the dense-code SAEs (ReLU, Gated, JumpReLU) share: one dense encoder with a bias."""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from switchsae.config import SAEConfig
from switchsae.saes.base import SparseAutoencoder


class DenseEncoderSAE(SparseAutoencoder):
    """Base of SAEs whose code ``z ∈ R^M`` is computed from every latent's pre-activation::

        pre = W_enc (x − b_pre) + b_enc            W_enc: M×d (rows), b_enc ∈ R^M

    The code is dense (``Latents(values=[T, M], indices=None)``), so the decoder is a dense
    matmul too. Init: decoder rows random with norm ``decoder_init_norm``, ``W_enc = W_decᵀ``
    (row-equal in our storage), ``b_enc = 0``. Subclasses add their parameters and then call
    :meth:`reset_parameters`. The encoder always runs in float32 (``matmul_dtype`` only affects
    the no-grad selection matmul of the TopK family; here the matmul is in the graph).
    """

    #: norm of the decoder rows at initialisation
    decoder_init_norm: ClassVar[float] = 1.0
    specific_settings = frozenset({"l1_coeff"})

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.W_enc = nn.Parameter(torch.empty(cfg.width, cfg.d_model))
        self.b_enc = nn.Parameter(torch.zeros(cfg.width))

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        super().reset_parameters(generator)
        with torch.no_grad():
            self.W_dec.mul_(self.decoder_init_norm)
            self.W_enc.copy_(self.W_dec)
            self.b_enc.zero_()

    def project(self, x: Tensor) -> Tensor:
        """``W_enc (x − b_pre)`` for normalised ``x: [T, d]`` → ``[T, M]`` (no bias)."""
        return (x - self.b_pre) @ self.W_enc.t()

    def pre_activations(self, x: Tensor) -> Tensor:
        """``pre = W_enc (x − b_pre) + b_enc`` → ``[T, M]``."""
        return self.project(x) + self.b_enc

    def flops(self) -> dict[str, int]:
        """Forward ``2dM`` (dense encoder) ``+ 2dM`` (dense decoder) ``= 4dM``.

        Training: both matmuls are dense, and a dense matmul's backward (gradients of input and
        weight) costs twice its forward, so ``train = 3 · 4dM = 12dM``. Elementwise ``O(M)`` terms
        are left out.
        """
        d, M = self.cfg.d_model, self.cfg.width
        return {"forward": 4 * d * M, "train": 12 * d * M}
