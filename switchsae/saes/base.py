"""The one interface every SAE implements, and what they share.

Notation (SPEC §1): ``x ∈ R^d`` an activation, ``M`` latents, ``k`` active latents, ``T`` tokens.
Decoder vectors are stored one latent per row, ``W_dec: [M, d]`` (the paper's columns), and so
are encoder vectors, ``W_enc: [M, d]``.

Units: ``encode`` takes raw activations and multiplies them by ``cfg.act_scale`` (the dataset
normalisation constant, 1 by default); ``decode`` divides it back out, so users and metrics see
original units while the loss, learning rate and weights live in the normalised space.

A code is a :class:`Latents`: ``values`` with ``indices`` (``[T, K]`` each, the k selected
latents per token; padding entries have value 0) or, for the dense ReLU-style SAEs,
``values: [T, M]`` with ``indices = None``. Subclasses implement ``_encode`` on normalised
input; the trainer, evaluator and apps only ever call the methods defined here.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

import torch
from torch import Tensor, nn

from switchsae.config import SAEConfig
from switchsae.distributed.group import LOCAL, Group
from switchsae.kernels.sparse import dense_codes, sparse_decode
from switchsae.optim import BFloat16Copy
from switchsae.saes.auxk import auxk_loss
from switchsae.saes.geometric_median import geometric_median


@dataclass
class Latents:
    """A batch of codes, sparse (``values``, ``indices``) or dense (``indices is None``)."""

    values: Tensor
    indices: Tensor | None = None

    def l0(self) -> Tensor:
        """Number of non-zero latents per token, ``[T]``."""
        return (self.values != 0).sum(-1)

    def fired(self, width: int) -> Tensor:
        """How often each latent is non-zero in this batch, ``[M]`` (int64)."""
        active = self.values != 0
        if self.indices is None:
            return active.sum(0)
        return torch.bincount(self.indices[active], minlength=width)

    def to_dense(self, width: int) -> Tensor:
        """The ``[T, M]`` code (a reference path; never used in training)."""
        return self.values if self.indices is None else dense_codes(self.values, self.indices, width)


@dataclass
class SAEOutput:
    """What ``forward`` returns: the reconstruction (raw units), the code, any routing info and,
    where the forward computed it on the way (the TopK family, kernels/core.py), the mean squared
    error ``(1/T) Σ_t ‖x_t − x̂_t‖²`` of the input in normalised units."""

    x_hat: Tensor
    latents: Latents
    extras: dict[str, Any] = field(default_factory=dict)  # tensors, a Switch SAE's Assignment
    mse: Tensor | None = None


class SparseAutoencoder(nn.Module):
    """Base class: ``x̂ = W_decᵀ z + b_pre`` with ``z = encode(x)``; subclasses define the encoder.

    Subclasses set ``unit_norm_decoder`` (decoder rows kept at norm 1 after every step, with the
    gradient's component along each row removed before it; see :meth:`param_groups`) and
    ``specific_settings``, and implement ``_encode``, ``flops`` and optionally ``extra_losses``.
    """

    #: the encoder weight: every subclass registers one
    W_enc: nn.Parameter
    unit_norm_decoder: ClassVar[bool] = True
    #: the architecture-specific settings (SAEConfig and TrainConfig field names) this SAE reads;
    #: the CLI refuses one given for an architecture that does not read it, sweeps drop it
    specific_settings: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        self.W_dec = nn.Parameter(torch.empty(cfg.width, cfg.d_model))
        self.b_pre = nn.Parameter(torch.zeros(cfg.d_model))
        #: dtype of the dense selection matmul (the trainer picks it: kernels/autotune.py)
        self.matmul_dtype = torch.float32
        self._encoder_bf16: BFloat16Copy | None = None
        #: row-sparse weight gradients for the sparse-code (TopK-family) paths, see kernels/sparse.py
        self.sparse_grads = False
        #: per latent, training tokens seen since it last fired (set by the trainer, read by AuxK)
        self.tokens_since_fired: Tensor | None = None
        #: the ranks whose shards make up one training batch: batch statistics (dead latents, load
        #: fractions, a batch-wide TopK) are reduced over them (switchsae.distributed; one process: LOCAL)
        self.batch_group: Group = LOCAL

    @classmethod
    def token_ids_needed(cls, cfg: SAEConfig) -> bool:
        """Whether an SAE of ``cfg`` needs each row's token id in ``forward(x, token_ids=...)``."""
        return False

    @property
    def needs_token_ids(self) -> bool:
        return self.token_ids_needed(self.cfg)

    # -- initialisation -------------------------------------------------------------------
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Random unit-norm decoder rows; subclasses tie their encoders to them."""
        with torch.no_grad():
            self.W_dec.copy_(torch.randn(self.W_dec.shape, generator=generator))
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True))
            self.b_pre.zero_()

    def init_from_data(self, x: Tensor) -> None:
        """Set the input-centring biases to the geometric median of a sample (raw units)."""
        with torch.no_grad():
            self.b_pre.copy_(geometric_median(x.float() * self.cfg.act_scale))

    # -- the model ------------------------------------------------------------------------
    def encode(self, x: Tensor) -> Latents:
        """The code of raw activations ``x: [T, d]``."""
        return self._encode(self._check_input(x))[0]

    def _encode(self, x: Tensor) -> tuple[Latents, dict[str, Tensor]]:
        """Code of normalised ``x``, plus extras the loss needs (e.g. router probabilities)."""
        raise NotImplementedError

    def decode(self, latents: Latents) -> Tensor:
        """``x̂ = (Σ_j z_j W_dec[j] + b_pre) / act_scale``."""
        if latents.indices is None:
            out = latents.values @ self.W_dec
        else:
            out = sparse_decode(latents.values, latents.indices, self.W_dec, self.sparse_grads)
        return (out + self.b_pre) / self.cfg.act_scale

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> SAEOutput:
        """Encode and decode raw ``x: [T, d]``; ``token_ids: [T]`` (the token of each row) is read
        only by SAEs that route by it (:meth:`token_ids_needed`)."""
        latents, extras = self._encode(self._check_input(x))
        return SAEOutput(self.decode(latents), latents, extras)

    @contextmanager
    def inference(self) -> Iterator[SparseAutoencoder]:
        """Eval mode inside the block, the previous mode after: what every measurement of a trained SAE
        runs in (expert-choice and Sinkhorn routing then route top-1, BatchTopK keeps its threshold
        and does not update it), whatever mode the SAE was handed over in."""
        was_training = self.training
        self.eval()
        try:
            yield self
        finally:
            self.train(was_training)

    def reconstruct(self, x: Tensor, token_ids: Tensor | None = None) -> Tensor:
        """``x̂`` for activations of any leading shape ``[..., d]`` (for patching into a model)."""
        flat = x.reshape(-1, x.shape[-1]).float()
        ids = None if token_ids is None else token_ids.reshape(-1)
        return self(flat, token_ids=ids).x_hat.reshape(x.shape).to(x.dtype)

    def _check_input(self, x: Tensor) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.cfg.d_model:
            raise ValueError(f"expected activations of shape [tokens, {self.cfg.d_model}], got {tuple(x.shape)}")
        if not x.dtype.is_floating_point:
            raise ValueError(f"expected floating-point activations, got {x.dtype}")
        return x.float() * self.cfg.act_scale

    # -- training -------------------------------------------------------------------------
    def loss(self, x: Tensor, out: SAEOutput) -> dict[str, Tensor]:
        """Named loss terms (weights applied) and their sum under ``"loss"``.

        ``mse = (1/T) Σ_t ‖x_t − x̂_t‖²`` in normalised units: ``out.mse`` where the forward computed
        it (``x`` must then be the batch given to the forward), else from ``x`` and ``out.x_hat``.
        """
        scale = self.cfg.act_scale
        mse = out.mse if out.mse is not None else (x.float() - out.x_hat).pow(2).sum(-1).mean() * scale**2
        terms = {"mse": mse}
        terms.update(self.extra_losses(x, out))
        terms["loss"] = cast(Tensor, sum(terms.values()))
        return terms

    def extra_losses(self, x: Tensor, out: SAEOutput) -> dict[str, Tensor]:
        """Architecture-specific terms (sparsity penalties, load balancing) for raw activations ``x``;
        none by default."""
        return {}

    def batch_stats(self, out: SAEOutput) -> dict[str, float]:
        """Architecture-specific numbers to log for a training batch; none by default."""
        return {}

    # -- dead latents ---------------------------------------------------------------------
    def record_firing(self, latents: Latents, n_tokens: int) -> None:
        """Advance the dead-latent counter by a batch of ``n_tokens`` tokens on each rank of the
        batch group: every latent's count grows by the batch's tokens, the ones that fired on any
        rank restart at 0."""
        counter = self.tokens_since_fired
        assert counter is not None, "record_firing runs in training, where the trainer sets tokens_since_fired"
        counter += n_tokens * self.batch_group.size
        counter[self.batch_group.any(latents.fired(self.cfg.width) > 0)] = 0

    def dead_latents(self) -> Tensor | None:
        """``[M]`` bool: no firing for ``cfg.dead_tokens`` training tokens (None outside training)."""
        return None if self.tokens_since_fired is None else self.tokens_since_fired >= self.cfg.dead_tokens

    def auxk_terms(self, x: Tensor, out: SAEOutput) -> dict[str, Tensor]:
        """``{"auxk": ...}`` when ``cfg.auxk_coeff`` is set and some latent is dead (saes/auxk.py),
        over the groups of :meth:`auxk_groups`; else nothing."""
        if not self.cfg.auxk_coeff:
            return {}
        dead = self.dead_latents()
        if dead is None or not dead.any():
            return {}
        return {"auxk": self.auxk_term(x, out, dead)}

    def auxk_term(self, x: Tensor, out: SAEOutput, dead: Tensor) -> Tensor:
        """``auxk_coeff · L_auxk`` for the dead latents ``dead`` (saes/auxk.py)."""
        return auxk_loss(self, x, out, dead, self.auxk_groups(out))

    def auxk_groups(self, out: SAEOutput) -> list[tuple[Tensor, range]]:
        """``(tokens, latent range)`` pairs AuxK picks dead latents within (TopK-family SAEs)."""
        raise NotImplementedError

    def selection_weights(self) -> Tensor:
        """``W_enc`` as the no-grad selection matmul reads it: itself in fp32; with a bf16
        ``matmul_dtype`` a bf16 copy that the optimizer keeps current row by row."""
        return self.W_enc if self.matmul_dtype == torch.float32 else self._bf16_encoder().get()

    def _bf16_encoder(self) -> BFloat16Copy:
        if self._encoder_bf16 is None:
            self._encoder_bf16 = BFloat16Copy(self.W_enc)
        return self._encoder_bf16

    def param_groups(self) -> list[dict]:
        """Optimizer parameter groups: with ``unit_norm_decoder`` the decoder sits in a
        ``unit_norm_rows`` group, whose rows :class:`switchsae.optim.LazyAdam` keeps at norm 1
        (gradient component along each row removed before the step, row renormalised after); with
        a bf16 selection the encoder sits in a group carrying its bf16 copy, which the optimizer
        rewrites as it updates rows (:class:`switchsae.optim.BFloat16Copy`)."""
        special: list[dict[str, Any]] = []
        if self.unit_norm_decoder:
            special.append({"params": [self.W_dec], "unit_norm_rows": True})
        if self.matmul_dtype != torch.float32:
            special.append({"params": [self.W_enc], "low_precision_copy": self._bf16_encoder()})
        taken = {id(p) for group in special for p in group["params"]}
        return [{"params": [p for p in self.parameters() if id(p) not in taken]}, *special]

    # -- cost -----------------------------------------------------------------------------
    def flops(self) -> dict[str, int]:
        """FLOPs per token: ``forward`` and ``train`` (forward + backward), SPEC §2."""
        raise NotImplementedError
