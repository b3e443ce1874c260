"""Tiny SAEs of every registered architecture (d=16, M=64, k=4, N=4 experts for Switch)."""
from __future__ import annotations

from typing import Any, Callable

import pytest
import torch

from switchsae.config import SAEConfig
from switchsae.saes import SparseAutoencoder, build_sae

D_MODEL, WIDTH, K, N_EXPERTS, TOKENS = 16, 64, 4, 4, 64


def tiny_config(arch: str, **changes: Any) -> SAEConfig:
    """A small config; the JumpReLU bandwidth is wide enough that some latents sit in its window."""
    fields = dict(arch=arch, d_model=D_MODEL, width=WIDTH, k=K, n_experts=N_EXPERTS if arch == "switch" else 1,
                  jump_bandwidth=0.1)
    return SAEConfig(**{**fields, **changes})


@pytest.fixture
def make_sae() -> Callable[..., SparseAutoencoder]:
    """Factory: ``make_sae(arch, **cfg_changes)`` → a freshly initialised SAE (seeded)."""

    def make(arch: str, **changes: Any) -> SparseAutoencoder:
        torch.manual_seed(0)
        return build_sae(tiny_config(arch, **changes))

    return make


@pytest.fixture
def batch() -> torch.Tensor:
    """``[TOKENS, D_MODEL]`` Gaussian activations with a non-zero mean."""
    gen = torch.Generator().manual_seed(1)
    return torch.randn(TOKENS, D_MODEL, generator=gen) + 0.5
