"""JumpReLU SAE (Rajamanoharan et al., 2024) trained on L0 with straight-through estimators."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from switchsae.config import SAEConfig
from switchsae.saes.base import Latents, SAEOutput
from switchsae.saes.dense import DenseEncoderSAE


def _window(pre: Tensor, theta: Tensor, eps: float) -> Tensor:
    """``(1/ε) K((pre − θ)/ε)`` with the rectangle kernel ``K(u) = 1[|u| < 1/2]``."""
    return ((pre - theta).abs() < eps / 2).to(pre.dtype) / eps


class _ThresholdFunction(torch.autograd.Function):
    """Shared context of the two functions below: inputs ``pre: [T, M]``, ``θ: [M]``, ``ε``."""

    @staticmethod
    def setup_context(ctx, inputs: tuple[Tensor, Tensor, float], output: Tensor) -> None:
        pre, theta, ctx.eps = inputs
        ctx.save_for_backward(pre, theta)


class JumpReLU(_ThresholdFunction):
    """``JumpReLU_θ(pre) = pre · H(pre − θ)``, with the paper's pseudo-derivatives::

        ∂/∂pre = H(pre − θ)
        ∂/∂θ   = −(θ/ε) K((pre − θ)/ε)          (summed over tokens)
    """

    @staticmethod
    def forward(pre: Tensor, theta: Tensor, eps: float) -> Tensor:
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, theta = ctx.saved_tensors
        grad_theta = -(theta * _window(pre, theta, ctx.eps) * grad).sum(0)
        return grad * (pre > theta), grad_theta, None


class Step(_ThresholdFunction):
    """``H(pre − θ)``, with ``∂/∂pre = 0`` and ``∂/∂θ = −(1/ε) K((pre − θ)/ε)`` (summed over tokens)."""

    @staticmethod
    def forward(pre: Tensor, theta: Tensor, eps: float) -> Tensor:
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, theta = ctx.saved_tensors
        return None, -(_window(pre, theta, ctx.eps) * grad).sum(0), None


class JumpReLUSAE(DenseEncoderSAE):
    """``z = pre ⊙ H(pre − θ)``, ``pre = W_enc (x − b_pre) + b_enc``, ``x̂ = W_dec z + b_pre``::

        θ = exp(log_threshold)                         per latent, init cfg.jump_threshold
        L = (1/T) Σ_t [ ‖x_t − x̂_t‖² + λ Σ_j H(pre_tj − θ_j) ]          λ = cfg.l1_coeff

    ``H`` has no useful derivative, so θ learns through straight-through estimators with a
    rectangle kernel of bandwidth ``ε = cfg.jump_bandwidth`` (:class:`JumpReLU`, :class:`Step`):
    the reconstruction pulls θ down where latents just below it would help, the L0 term pushes
    it up. Decoder rows are unit norm; init ``W_enc = W_decᵀ``, ``b_enc = 0``.
    Parameters ``2Md + 2M + d``. FLOPs: see :meth:`DenseEncoderSAE.flops`.
    """

    specific_settings = DenseEncoderSAE.specific_settings | {"jump_threshold", "jump_bandwidth"}

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.log_threshold = nn.Parameter(torch.empty(cfg.width))
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        super().reset_parameters(generator)
        with torch.no_grad():
            self.log_threshold.fill_(math.log(self.cfg.jump_threshold))

    def _encode(self, x: Tensor) -> tuple[Latents, dict[str, Tensor]]:
        pre = self.pre_activations(x)
        z = JumpReLU.apply(pre, self.log_threshold.exp(), self.cfg.jump_bandwidth)
        return Latents(z), {"pre": pre}

    def extra_losses(self, x: Tensor, out: SAEOutput) -> dict[str, Tensor]:
        """``"l0": λ (1/T) Σ_t Σ_j H(pre_tj − θ_j)``."""
        active = Step.apply(out.extras["pre"], self.log_threshold.exp(), self.cfg.jump_bandwidth)
        return {"l0": self.cfg.l1_coeff * active.sum(-1).mean()}
