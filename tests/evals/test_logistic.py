"""The probes and statistics of the evals: planted signals recovered, the optimum is stationary."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from switchsae.evals.logistic import fit_logistic, fit_probe_bank
from switchsae.evals.stats import balanced_accuracy, f1_score, mean_interval


def test_balanced_accuracy_and_f1_by_hand():
    truth = torch.tensor([1, 1, 1, 1, 0, 0], dtype=torch.bool)
    predicted = torch.tensor([1, 1, 1, 0, 1, 0], dtype=torch.bool)
    assert balanced_accuracy(predicted, truth) == pytest.approx(0.5 * (3 / 4 + 1 / 2))
    assert f1_score(predicted, truth) == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
    assert f1_score(torch.zeros(4, dtype=torch.bool), truth[:4]) == 0.0
    with pytest.raises(ValueError, match="both classes"):
        balanced_accuracy(predicted, torch.ones(6, dtype=torch.bool))


def test_mean_interval_uses_student_t():
    mean, half = mean_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 * 1.0 / math.sqrt(3))
    assert mean_interval([0.7]) == (0.7, 0.0)


def test_logistic_probe_recovers_a_planted_separable_signal():
    generator = torch.Generator().manual_seed(0)
    scales = torch.linspace(0.1, 50, 30)  # wildly different feature scales
    y = torch.rand(600, generator=generator) < 0.3
    x = torch.randn(600, 30, generator=generator) * scales
    x[:, 7] += torch.where(y, 3.0, -3.0) * scales[7]
    probe = fit_logistic(x[:400], y[:400])
    assert balanced_accuracy(probe.predict(x[400:]), y[400:]) > 0.98
    assert probe.weight.abs().argmax() == 7


def test_logistic_probe_stops_at_the_optimum_of_its_objective():
    """The gradient of J(w, b) (balanced weights, L2 = 1/(2Cn)) vanishes at the returned probe."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(300, 5, generator=generator)
    y = (x @ torch.tensor([1.0, -2.0, 0.5, 0.0, 0.0]) + 0.8 * torch.randn(300, generator=generator)) > 0.5
    probe = fit_logistic(x, y, C=0.5)
    w = probe.weight.clone().requires_grad_(True)
    b = torch.tensor(probe.bias, requires_grad=True)
    z = (x - probe.mean) / probe.scale
    n, n_pos = len(y), int(y.sum())
    weights = torch.where(y, n / (2 * n_pos), n / (2 * (n - n_pos)))
    loss = (weights * F.softplus(-(y.float() * 2 - 1) * (z @ w + b))).mean() + (w @ w) / (2 * 0.5 * n)
    loss.backward()
    assert w.grad.abs().max() < 1e-4 and b.grad.abs() < 1e-4


def test_logistic_probe_refuses_one_class():
    with pytest.raises(ValueError, match="positive and negative"):
        fit_logistic(torch.randn(10, 3), torch.ones(10))


def test_probe_bank_finds_each_class_direction_and_l1_makes_it_sparse():
    generator = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 4, (400,), generator=generator)
    x = torch.randn(400, 40, generator=generator) * 0.3
    x[torch.arange(400), labels] += 2.0
    targets = F.one_hot(labels, 4).float()
    dense = fit_probe_bank(x, targets, epochs=20, batch_size=100)
    assert (dense.scores(x).argmax(1) == labels).float().mean() > 0.97
    sparse = fit_probe_bank(x, targets, epochs=20, batch_size=100, l1=0.05)
    assert torch.equal(sparse.weight.argmax(1), torch.arange(4))
    assert sparse.weight[:, 4:].abs().sum() < 0.2 * dense.weight[:, 4:].abs().sum()
