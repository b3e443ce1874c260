"""Logistic-regression probes in torch: one binary probe fitted exactly (L-BFGS), and a bank of
one-vs-rest probes fitted by Adam with an optional L1 penalty (SAEBench's ``train_multi_probe``).

**Binary probe** (:func:`fit_logistic`), the probe of sparse probing and of the k-sparse probes of
absorption. Features are standardised with the training rows' mean ``μ`` and standard deviation
``σ`` (``σ = 1`` for a constant feature), ``x̃ = (x − μ)/σ``, so a probe does not depend on the
scale of a latent (a Switch latent's values carry its router gate, a TopK latent's do not). With
labels ``y_i ∈ {0, 1}``, signs ``s_i = 2y_i − 1`` and balanced class weights ``ω_c = n / (2 n_c)``
it minimises::

    J(w, b) = (1/n) Σ_i ω_{y_i} log(1 + exp(−s_i (w·x̃_i + b))) + ‖w‖² / (2 C n)

which is scikit-learn's ``LogisticRegression(C, class_weight="balanced")`` objective divided by
``n``; ``C = 1`` is its default and SAEBench's. It is convex; L-BFGS with a strong-Wolfe line search
runs to its tolerance on the full batch. A row is predicted positive when ``w·x̃ + b > 0``.

**Probe bank** (:func:`fit_probe_bank`): ``P`` independent logistic probes ``W: [P, p]``, ``b: [P]``
on multi-hot targets ``Y: [n, P]``, trained together by minibatch Adam on::

    mean_{i,c} BCE_{pos_weight_c}(x_i·W_c + b_c, Y_ic) + λ₁ · mean_c ‖W_c‖₁

with ``pos_weight_c = (#negatives of c) / (#positives of c)`` (both classes of each probe weigh the
same), Adam's L2 ``weight_decay`` and a learning rate decaying exponentially from ``lr`` to
``end_lr`` over the epochs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class LogisticProbe:
    """A fitted binary probe: ``score(x) = ((x − mean) / scale) · weight + bias``."""

    mean: Tensor
    scale: Tensor
    weight: Tensor
    bias: float

    def score(self, x: Tensor) -> Tensor:
        return ((x.float() - self.mean) / self.scale) @ self.weight + self.bias

    def predict(self, x: Tensor) -> Tensor:
        return self.score(x) > 0


def _check_labels(y: Tensor) -> Tensor:
    y = y.bool().flatten()
    if y.all() or not y.any():
        raise ValueError("a logistic probe needs positive and negative training rows")
    return y


def fit_logistic(x: Tensor, y: Tensor, C: float = 1.0, max_iter: int = 200, tol: float = 1e-6) -> LogisticProbe:
    """Minimise the module doc's ``J(w, b)`` on rows ``x: [n, p]`` and boolean labels ``y: [n]``."""
    y = _check_labels(y)
    x = x.float()
    n = x.shape[0]
    mean = x.mean(0)
    scale = x.std(0, unbiased=False)
    scale = torch.where(scale > 1e-12, scale, torch.ones_like(scale))
    z = (x - mean) / scale
    signs = y.float() * 2 - 1
    n_pos = int(y.sum())
    weights = torch.where(y, n / (2 * n_pos), n / (2 * (n - n_pos)))
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    optimiser = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, tolerance_grad=tol,
                                  tolerance_change=tol * 1e-3, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimiser.zero_grad()
        margins = signs * (z @ w + b)
        loss = (weights * F.softplus(-margins)).mean() + (w @ w) / (2 * C * n)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimiser.step(closure)
    return LogisticProbe(mean, scale, w.detach(), float(b.detach()))


@dataclass
class ProbeBank:
    """``P`` linear probes, ``scores(x) = x Wᵀ + b`` (``[n, P]``)."""

    weight: Tensor
    bias: Tensor

    def scores(self, x: Tensor) -> Tensor:
        return x.float() @ self.weight.t() + self.bias


def fit_probe_bank(x: Tensor, targets: Tensor, *, epochs: int = 50, lr: float = 1e-2, end_lr: float = 1e-5,
                   weight_decay: float = 1e-6, l1: float = 0.0, batch_size: int = 4096,
                   seed: int = 0) -> ProbeBank:
    """Fit the module doc's probe bank on ``x: [n, p]`` and multi-hot ``targets: [n, P]``."""
    targets = targets.float()
    n, n_probes = targets.shape
    positives = targets.sum(0)
    if bool((positives == 0).any()) or bool((positives == n).any()):
        raise ValueError("every probe of the bank needs positive and negative training rows")
    pos_weight = (n - positives) / positives
    weight = torch.zeros(n_probes, x.shape[1], requires_grad=True)
    bias = torch.zeros(n_probes, requires_grad=True)
    optimiser = torch.optim.Adam([weight, bias], lr=lr, weight_decay=weight_decay)
    gamma = math.exp(math.log(end_lr / lr) / epochs)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimiser, gamma=gamma)
    generator = torch.Generator().manual_seed(seed)
    rows = x.float()
    bank = ProbeBank(weight, bias)
    with torch.enable_grad():
        for _ in range(epochs):
            for batch in torch.randperm(n, generator=generator).split(batch_size):
                xb = rows.index_select(0, batch)
                loss = F.binary_cross_entropy_with_logits(bank.scores(xb), targets[batch], pos_weight=pos_weight)
                if l1:
                    loss = loss + l1 * weight.abs().sum(1).mean()
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
            scheduler.step()
    return ProbeBank(weight.detach(), bias.detach())
