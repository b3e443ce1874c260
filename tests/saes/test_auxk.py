"""AuxK (saes/auxk.py) against a dense reference, inside each token's own experts for Switch,
with the decoder bias counted once (resuming with AuxK: tests/test_train.py)."""
from __future__ import annotations

import pytest
import torch

import switchsae as ss
from switchsae.config import RoutingConfig, SAEConfig
from switchsae.saes import build_sae

pytestmark = pytest.mark.usefixtures("kernel_backend")

D, M, N, K, K_AUX, T = 16, 64, 4, 4, 6, 48


def make(arch: str, routing: RoutingConfig = RoutingConfig(), encoder_bias: bool = False) -> ss.SparseAutoencoder:
    torch.manual_seed(0)
    experts = N if arch == "switch" else 1
    width = M // N * (N + int(routing.shared_expert)) if arch == "switch" else M
    sae = build_sae(SAEConfig(arch=arch, d_model=D, width=width, k=K, n_experts=experts, auxk_coeff=0.5,
                              auxk_k=K_AUX, dead_tokens=100, act_scale=0.7, encoder_bias=encoder_bias,
                              routing=routing if arch == "switch" else RoutingConfig()))
    if arch == "switch":
        with torch.no_grad():
            sae.W_router.mul_(8.0)
    if encoder_bias:
        with torch.no_grad():
            sae.b_enc.copy_(torch.randn(width) * 0.5)
    sae.tokens_since_fired = torch.zeros(width, dtype=torch.long)
    sae.tokens_since_fired[::3] = 100  # every third latent is dead
    return sae


def dense_auxk(sae, x: torch.Tensor, x_hat: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """``min(1, |D|/k_aux) · (1/T) Σ_t ‖r_t − ê_t‖²``, ``ê_t`` from the token's top-k_aux dead
    latents among ``allowed [T, M]``, written densely; ``r = x − x̂`` holds ``b_pre`` once."""
    s, dead = sae.cfg.act_scale, sae.dead_latents()
    residual = (x - x_hat.detach()) * s
    pre = (x * s - sae.b_pre) @ sae.W_enc.t()
    if getattr(sae, "b_enc", None) is not None:
        pre = pre + sae.b_enc
    candidates = pre.masked_fill(~(allowed & dead), float("-inf"))
    top = candidates.topk(K_AUX, dim=-1)
    keep = torch.zeros_like(pre, dtype=torch.bool).scatter(1, top.indices, top.values > float("-inf"))
    e_hat = torch.where(keep, pre.relu(), 0.0) @ sae.W_dec
    return 0.5 * min(1.0, int(dead.sum()) / K_AUX) * (residual - e_hat).pow(2).sum(-1).mean()


@pytest.mark.parametrize("arch, routing, encoder_bias", [
    ("topk", RoutingConfig(), False), ("batchtopk", RoutingConfig(), False), ("topk", RoutingConfig(), True),
    ("switch", RoutingConfig(), False), ("switch", RoutingConfig(router="top_e", experts_per_token=2), False),
    ("switch", RoutingConfig(shared_expert=True), False)],
    ids=["topk", "batchtopk", "topk-encoder-bias", "switch-top1", "switch-top2", "switch-shared"])
def test_auxk_equals_the_dense_reference_within_each_tokens_experts(arch, routing, encoder_bias):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(T, D, generator=gen) + 0.5
    sae = make(arch, routing, encoder_bias)
    out = sae(x)
    width = sae.cfg.width
    if arch == "switch":
        a = out.extras["assignment"]
        member = torch.zeros(T, sae.cfg.n_blocks, dtype=torch.bool)
        member[a.token, a.expert] = True
        allowed = member.repeat_interleave(sae.cfg.expert_width, dim=1)
    else:
        allowed = torch.ones(T, width, dtype=torch.bool)
    got = sae.loss(x, out)["auxk"]
    want = dense_auxk(sae, x, out.x_hat, allowed)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    names = ["W_enc", "W_dec", "b_pre"] + (["b_enc"] if encoder_bias else [])
    params = [getattr(sae, name) for name in names]
    for name, g, w in zip(names, torch.autograd.grad(got, params),
                          torch.autograd.grad(want, params)):
        g = g.to_dense() if g.is_sparse else g
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_no_auxk_term_without_dead_latents_or_outside_training():
    sae = make("topk")
    x = torch.randn(T, D)
    sae.tokens_since_fired.zero_()
    assert "auxk" not in sae.loss(x, sae(x))
    sae.tokens_since_fired = None  # not training: no counter, no term
    assert "auxk" not in sae.loss(x, sae(x))
