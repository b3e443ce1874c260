"""TopK SAE (Gao et al., 2024)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from switchsae.config import SAEConfig
from switchsae.kernels.core import sparse_core
from switchsae.kernels.sparse import select_topk, topk_encode
from switchsae.saes.base import Latents, SAEOutput, SparseAutoencoder


class TopKSAE(SparseAutoencoder):
    """``z = TopK(ReLU(W_enc (x − b_pre) + b_enc))``, ``x̂ = W_dec z + b_pre``; loss ``‖x − x̂‖²``.

    ``W_enc: M×d`` is initialised to ``W_decᵀ``. The encoder bias ``b_enc ∈ R^M`` exists only with
    ``cfg.encoder_bias`` (init 0; SAELens's TopK SAEs carry one, see apps/saelens.py); without it
    the SAE has no ``b_enc`` at all and ``b_enc = 0`` above. Parameters ``2Md + d`` (``+ M``).
    Only the k selected latents per token enter the graph (sparse backward, see
    :mod:`switchsae.kernels.sparse`). The fused training core (kernels/core.py) has no encoder
    bias, so with one ``forward`` encodes and decodes separately (same values, slower backward).
    """

    specific_settings = frozenset({"k", "encoder_bias", "auxk_coeff", "auxk_k", "dead_tokens", "matmul_dtype",
                                   "sparse_updates"})
    b_enc: nn.Parameter | None

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.W_enc = nn.Parameter(torch.empty(cfg.width, cfg.d_model))
        self.b_enc = nn.Parameter(torch.zeros(cfg.width)) if cfg.encoder_bias else None
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        super().reset_parameters(generator)
        with torch.no_grad():
            self.W_enc.copy_(self.W_dec)
            if self.b_enc is not None:
                self.b_enc.zero_()

    def _select(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The no-grad selection on normalised ``x``: ``(indices, values, x − b_pre)``, ``[T, k]`` codes."""
        with torch.no_grad():
            centred = x - self.b_pre
        values, indices = select_topk(centred, self.W_enc, self.cfg.k, self.selection_weights(), self.b_enc)
        return indices, values, centred

    def _encode(self, x: Tensor) -> tuple[Latents, dict[str, Tensor]]:
        indices, values, centred = self._select(x)
        z = topk_encode(x, self.b_pre, self.W_enc, indices, values, self.sparse_grads, centred, self.b_enc)
        return Latents(z, indices), {}

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> SAEOutput:
        """Encode, decode and the squared error in one autograd function (kernels/core.py); with an
        encoder bias, which that function does not take, encode then decode."""
        if self.b_enc is not None:
            return super().forward(x, token_ids)
        x = self._check_input(x)
        indices, values, centred = self._select(x)
        z, x_hat, mse = sparse_core(x, self.b_pre, self.W_enc, self.W_dec, indices, values, centred,
                                    sparse_grad=self.sparse_grads, x_hat_scale=1 / self.cfg.act_scale)
        return SAEOutput(x_hat, Latents(z, indices), mse=mse)

    def extra_losses(self, x: Tensor, out: SAEOutput) -> dict[str, Tensor]:
        """With ``auxk_coeff``: AuxK over the dead latents (saes/auxk.py)."""
        return self.auxk_terms(x, out)

    def auxk_groups(self, out: SAEOutput) -> list[tuple[Tensor, range]]:
        """One group: every token, every latent."""
        return [(torch.arange(out.x_hat.shape[0], device=out.x_hat.device), range(self.cfg.width))]

    def flops(self) -> dict[str, int]:
        """Forward ``2dM`` (encoder) ``+ 2kd`` (sparse decoder).

        Training adds the backward of the sparse parts only: the k gathered encoder rows and
        the k decoder rows each cost ``2kd`` forward and ``4kd`` backward, so
        ``train = 2dM + 12kd``.
        """
        d, M, k = self.cfg.d_model, self.cfg.width, self.cfg.k
        return {"forward": 2 * d * M + 2 * k * d, "train": 2 * d * M + 12 * k * d}
