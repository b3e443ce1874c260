"""Switch SAE against SPEC §1 and the pitfalls of SPEC §8."""
from __future__ import annotations

import pytest
import torch

from switchsae.saes.geometric_median import geometric_median
from switchsae.saes.routing import load_balance_loss

pytestmark = pytest.mark.usefixtures("kernel_backend")


def _dense_reference(sae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x̂ = p_{i*} W_dec^{i*} TopK(W_enc^{i*}(x − b_pre)) + b_pre`` with every expert's pre-activations."""
    cfg = sae.cfg
    probs = torch.softmax((x - sae.b_router) @ sae.W_router.t(), dim=-1)
    p_chosen, expert = probs.max(dim=-1)
    pre = (x - sae.b_pre) @ sae.W_enc.t()
    other_expert = torch.arange(cfg.width) // cfg.expert_width != expert[:, None]
    top = pre.masked_fill(other_expert, float("-inf")).topk(cfg.k, dim=-1)
    z = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu()) * p_chosen[:, None]
    return z @ sae.W_dec + sae.b_pre, z, expert


def test_forward_matches_a_dense_reference(make_sae, batch):
    sae = make_sae("switch")
    sae.init_from_data(batch)
    with torch.no_grad():
        expected, z, expert = _dense_reference(sae, batch)
        out = sae(batch)
    torch.testing.assert_close(out.x_hat, expected)
    torch.testing.assert_close(out.latents.to_dense(sae.cfg.width), z)
    a = out.extras["assignment"]
    assert torch.equal(a.expert[torch.argsort(a.token)], expert)


def test_gradients_match_the_dense_reference(make_sae, batch):
    """The expert-sorted sparse path gives every parameter the dense reference's gradient."""
    sae = make_sae("switch")
    sae.init_from_data(batch)
    upstream = torch.randn(batch.shape, generator=torch.Generator().manual_seed(1))
    params = [p for _, p in sae.named_parameters()]
    got = torch.autograd.grad((sae(batch).x_hat * upstream).sum(), params)
    want = torch.autograd.grad((_dense_reference(sae, batch)[0] * upstream).sum(), params)
    for (name, _), g, w in zip(sae.named_parameters(), got, want):
        torch.testing.assert_close(g, w, msg=name)


def test_router_gets_gradient_from_the_reconstruction_alone(make_sae, batch):
    sae = make_sae("switch")
    sae.init_from_data(batch)
    sae.loss(batch, sae(batch))["mse"].backward()
    assert sae.W_router.grad.abs().sum() > 0
    assert sae.b_router.grad.abs().sum() > 0


@pytest.mark.parametrize("seed", range(3))
def test_balance_loss_is_one_for_a_uniform_router_whatever_the_assignment(seed):
    gen = torch.Generator().manual_seed(seed)
    n_experts, tokens = 4, 64
    probs = torch.softmax(torch.zeros(tokens, n_experts), dim=-1)
    expert = torch.randint(0, n_experts, (tokens,), generator=gen)
    assert load_balance_loss(probs, torch.bincount(expert, minlength=n_experts).tolist()).item() == 1.0


def test_balance_loss_is_n_sum_f_p_with_gradient_to_the_router(make_sae, batch):
    """``N Σ f_i P_i``, not ``Σ (f_i − 1/N)²`` (whose ``f`` carries no gradient)."""
    sae = make_sae("switch")
    with torch.no_grad():
        sae.W_router.zero_()  # uniform router; every token goes to expert 0 (argmax of a tie)
    out = sae(batch)
    losses = sae.loss(batch, out)
    assert losses["balance"].item() == sae.cfg.routing.aux_coeff * 1.0
    losses["balance"].backward()
    assert sae.W_router.grad.abs().sum() > 0
    a = out.extras["assignment"]
    f = torch.bincount(a.expert, minlength=sae.cfg.n_experts).float() / a.expert.numel()
    torch.testing.assert_close(load_balance_loss(a.probs, a.counts), sae.cfg.n_experts * (f * a.probs.mean(0)).sum())


def test_router_runs_once_per_training_step(make_sae, batch, monkeypatch):
    sae = make_sae("switch")
    calls = []
    softmax = torch.softmax

    def counting_softmax(*args, **kwargs):
        calls.append(1)
        return softmax(*args, **kwargs)

    monkeypatch.setattr(torch, "softmax", counting_softmax)
    sae.loss(batch, sae(batch))["loss"].backward()
    assert len(calls) == 1


def test_b_pre_and_b_router_are_separate_and_both_start_at_the_median(make_sae, batch):
    sae = make_sae("switch")
    sae.init_from_data(batch)
    median = geometric_median(batch)
    params = dict(sae.named_parameters())
    assert "b_pre" in params and "b_router" in params
    assert sae.b_pre.data_ptr() != sae.b_router.data_ptr()
    torch.testing.assert_close(sae.b_pre.detach(), median)
    torch.testing.assert_close(sae.b_router.detach(), median)
    with torch.no_grad():
        sae.b_pre.add_(1.0)
    torch.testing.assert_close(sae.b_router.detach(), median)


def test_geometric_median_on_a_known_case():
    """Points ``c + r_t u_t`` whose unit directions ``u_t`` cancel have median ``c`` (the optimality
    condition ``Σ_t (x_t − y)/‖x_t − y‖ = 0`` holds at ``y = c``); unequal radii, one of them an
    outlier, pull the mean away."""
    d = 16
    centre = torch.linspace(-2.0, 3.0, d)
    eye = torch.eye(d)
    directions = torch.cat([eye[:4], -eye[:4]])
    radii = torch.tensor([1.0, 2.0, 3.0, 4.0, 2.0, 5.0, 1.0, 1000.0])
    points = centre + radii[:, None] * directions
    median = geometric_median(points)
    torch.testing.assert_close(median, centre, atol=1e-3, rtol=0)
    assert (points.mean(0) - centre).norm() > 100
