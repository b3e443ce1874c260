"""Shared fixtures: tiny synthetic activations and configs."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)


@pytest.fixture
def acts() -> torch.Tensor:
    """2,000 synthetic activations of width 16 with a known sparse structure."""
    from switchsae.sources.synthetic import synthetic_activations

    return synthetic_activations(2000, 16, n_features=64, active=3, seed=0)


@pytest.fixture(params=["native", "torch"])
def kernel_backend(request, monkeypatch) -> str:
    """Run a test with the compiled CPU kernels and again with the plain-torch paths."""
    from switchsae.kernels import native

    if request.param == "torch":
        monkeypatch.setenv("SWITCHSAE_NATIVE", "0")
    elif not native.available():
        pytest.skip("compiled kernels unavailable here (no C compiler)")
    return request.param
