"""Reconstruction metrics on held-out activations, as sums over tokens and one final division.

Sums (not means) are accumulated batch by batch so that the same numbers reduce across ranks.

    FVU  = Σ‖x − x̂‖² / Σ‖x − x̄‖²      (x̄: mean over the evaluated tokens),  FVE = 1 − FVU
    MSE  = (1/T) Σ‖x − x̂‖²             (raw activation units)
    L0   = mean number of non-zero latents per token
    dead = fraction of latents that never fire over all evaluated tokens

For Switch SAEs also the expert load: fraction of tokens per expert, its coefficient of
variation (std / mean of the counts) and its entropy in nats (log N when perfectly balanced).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from switchsae.saes import SparseAutoencoder


@dataclass
class MetricSums:
    """Running sums over evaluated tokens."""

    width: int
    n_experts: int
    tokens: int = 0
    sq_err: float = 0.0
    sum_x: Tensor | None = None
    sum_sq_norm: float = 0.0
    l0: float = 0.0
    fired: Tensor = field(init=False)
    expert_tokens: Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.fired = torch.zeros(self.width, dtype=torch.long)
        self.expert_tokens = torch.zeros(self.n_experts, dtype=torch.long)

    def add(self, x: Tensor, sae_out) -> None:
        x = x.double()
        self.tokens += x.shape[0]
        self.sq_err += (x - sae_out.x_hat.double()).pow(2).sum().item()
        self.sum_x = x.sum(0).cpu() if self.sum_x is None else self.sum_x + x.sum(0).cpu()
        self.sum_sq_norm += x.pow(2).sum().item()
        self.l0 += sae_out.latents.l0().sum().item()
        self.fired += sae_out.latents.fired(self.width).cpu()
        if "assignment" in sae_out.extras:  # routed experts only (a shared expert takes every token)
            self.expert_tokens += sae_out.extras["assignment"].tokens_per_expert()[:self.n_experts]

    def result(self) -> dict[str, float]:
        if self.tokens == 0:
            raise ValueError("no held-out activations to evaluate")
        assert self.sum_x is not None  # set by the first add()
        total_var = self.sum_sq_norm - self.sum_x.pow(2).sum().item() / self.tokens
        fvu = self.sq_err / max(total_var, 1e-30)
        metrics = {
            "tokens": self.tokens,
            "mse": self.sq_err / self.tokens,
            "fvu": fvu,
            "fve": 1.0 - fvu,
            "l0": self.l0 / self.tokens,
            "dead_frac": (self.fired == 0).float().mean().item(),
        }
        if self.n_experts > 1:
            metrics.update(expert_load_stats(self.expert_tokens))
        return metrics


def expert_load_stats(counts: Tensor) -> dict:
    """Fraction per expert, coefficient of variation of the counts, entropy of the fractions."""
    frac = counts.double() / counts.sum().clamp_min(1)
    nonzero = frac[frac > 0]
    return {
        "expert_load": frac.tolist(),
        "expert_load_cv": (frac.std(unbiased=False) / frac.mean()).item(),
        "expert_load_entropy": -(nonzero * nonzero.log()).sum().item(),
        "expert_load_max_entropy": math.log(len(counts)),
    }


def check_finite_weights(sae: SparseAutoencoder) -> None:
    """Refuse an SAE whose weights hold NaN or inf: no metric of it would mean anything."""
    bad = {name: (int((~torch.isfinite(t)).sum()), t.numel()) for name, t in sae.state_dict().items()
           if t.is_floating_point() and not torch.isfinite(t).all()}
    if bad:
        counts = ", ".join(f"{name}: {count:,} of {total:,}" for name, (count, total) in bad.items())
        raise ValueError(f"the SAE's weights hold NaN or inf values ({counts}); it diverged or its file is "
                         "damaged, so it is not evaluated")


@torch.no_grad()
def evaluate(sae: SparseAutoencoder, batches: Iterable[Tensor], progress: bool = True) -> dict:
    """Metrics of ``sae`` over every batch in ``batches`` (tensors, or ``(x, token ids)`` pairs),
    plus FLOPs per token (SPEC §2); an SAE with NaN or inf weights is refused."""
    check_finite_weights(sae)
    sums = MetricSums(sae.cfg.width, sae.cfg.n_experts)
    device = sae.W_dec.device
    with sae.inference():
        for batch in tqdm(batches, desc="eval", unit="batch", disable=not progress):
            x, token_ids = batch if isinstance(batch, tuple) else (batch, None)
            x = x.to(device)
            sums.add(x, sae(x, token_ids=None if token_ids is None else token_ids.to(device)))
    flops = sae.flops()
    return {**sums.result(), "flops_per_token": flops["forward"], "train_flops_per_token": flops["train"]}
