"""Synthetic activations with a known sparse dictionary (for tests, benchmarks and demos).

Each row is ``x = μ + Σ_{f ∈ S} a_f · D_f + σ ε``: ``D`` holds ``n_features`` random unit vectors in
``R^d`` (superposition when ``n_features > d``), ``S`` holds ``active`` features drawn (with replacement) from
Zipf-like firing rates, magnitudes ``a_f ~ Exp(1)``, ``μ`` a fixed offset and ``ε`` Gaussian noise.
"""
from __future__ import annotations

import torch
from torch import Tensor


def synthetic_activations(
    n_tokens: int, d_model: int, n_features: int = 4096, active: int = 16, noise: float = 0.05, seed: int = 0
) -> Tensor:
    """``[n_tokens, d_model]`` float32 activations built as in the module docstring."""
    if min(n_tokens, d_model, n_features, active) < 1 or active > n_features:
        raise ValueError("n_tokens, d_model, n_features and active must be positive, with active <= n_features")
    gen = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(n_features, d_model, generator=gen)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    rates = 1.0 / torch.arange(1, n_features + 1).float() ** 0.7
    offset = torch.randn(d_model, generator=gen)
    out = torch.empty(n_tokens, d_model)
    for start in range(0, n_tokens, 8192):
        rows = min(8192, n_tokens - start)
        features = torch.multinomial(rates, rows * active, replacement=True, generator=gen).view(rows, active)
        magnitudes = torch.empty(rows, active).exponential_(generator=gen)
        x = torch.nn.functional.embedding_bag(features, dictionary, per_sample_weights=magnitudes, mode="sum")
        out[start:start + rows] = x + offset + noise * torch.randn(rows, d_model, generator=gen)
    return out
