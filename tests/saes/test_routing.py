"""Routing strategies behind the one Assignment contract: each against a dense reference (values
and every gradient), the assignment rules themselves, their losses, FLOPs and bad settings."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import switchsae as ss
from switchsae.config import RoutingConfig, SAEConfig
from switchsae.saes import build_sae
from switchsae.saes.routing import Hash
from switchsae.sources.synthetic import synthetic_activations

pytestmark = pytest.mark.usefixtures("kernel_backend")

D, M, K, N, T = 16, 64, 4, 4, 64
STRATEGIES = {
    "top1": RoutingConfig(),
    "top_e": RoutingConfig(router="top_e", experts_per_token=2),
    "shared": RoutingConfig(shared_expert=True),
    "top_e+shared": RoutingConfig(router="top_e", experts_per_token=2, shared_expert=True),
    "expert_choice": RoutingConfig(router="expert_choice", capacity_factor=1.5),
    "hash": RoutingConfig(router="hash"),
    "sinkhorn": RoutingConfig(router="sinkhorn"),
}


def make(routing: RoutingConfig, **changes) -> ss.SparseAutoencoder:
    torch.manual_seed(0)
    width = M // N * (N + int(routing.shared_expert))  # a shared expert is one more block of M/N latents
    sae = build_sae(SAEConfig(arch="switch", d_model=D, width=width, k=K, n_experts=N, routing=routing, **changes))
    with torch.no_grad():  # a router with opinions, so that assignments differ between tokens
        sae.W_router.mul_(8.0)
    return sae


@pytest.fixture
def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(T, D, generator=gen) + 0.5, torch.randint(0, 1000, (T,), generator=gen)


def dense_reference(sae, x: torch.Tensor, token: torch.Tensor, expert: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x̂, z`` from every latent's pre-activation: each token's TopK over the latents of the
    experts it has entries for, each latent times its expert's gate (router probability, 1 for a
    shared expert or hash routing), all in plain differentiable torch."""
    cfg = sae.cfg
    m, blocks = cfg.expert_width, cfg.n_blocks
    gates = torch.ones(T, blocks)
    if sae.router.learned:
        probs = torch.softmax((x - sae.b_router) @ sae.W_router.t(), dim=-1)
        gates = torch.cat([probs, torch.ones(T, blocks - N)], dim=1)
    member = torch.zeros(T, blocks, dtype=torch.bool)
    member[token, expert] = True
    pre = (x - sae.b_pre) @ sae.W_enc.t()
    allowed = member.repeat_interleave(m, dim=1)
    top = pre.masked_fill(~allowed, float("-inf")).topk(cfg.k, dim=-1)
    keep = torch.zeros_like(pre, dtype=torch.bool).scatter(1, top.indices, top.values > float("-inf"))
    z = torch.where(keep, pre.relu(), 0.0) * gates.repeat_interleave(m, dim=1)
    return z @ sae.W_dec + sae.b_pre, z


@pytest.mark.parametrize("name", STRATEGIES)
def test_each_strategy_equals_the_dense_reference_in_values_and_every_gradient(name, data):
    x, ids = data
    sae = make(STRATEGIES[name])
    sae.init_from_data(x)
    out = sae(x, token_ids=ids)
    a = out.extras["assignment"]
    want_x_hat, want_z = dense_reference(sae, x, a.token, a.expert)
    torch.testing.assert_close(out.x_hat, want_x_hat, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.latents.to_dense(sae.cfg.width), want_z, rtol=1e-4, atol=1e-5)
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    params = [p for p in sae.parameters()]
    got = torch.autograd.grad((out.x_hat * upstream).sum() + out.mse, params, allow_unused=True)
    want = torch.autograd.grad((want_x_hat * upstream).sum() + (x - want_x_hat).pow(2).sum(-1).mean(), params,
                               allow_unused=True)
    for (param_name, p), g, w in zip(sae.named_parameters(), got, want):
        g, w = (torch.zeros_like(p) if t is None else t for t in (g, w))
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4, msg=lambda m, n=param_name: f"{n}: {m}")


def test_top1_is_bit_for_bit_what_it_was_before_the_routing_contract():
    """30 training steps of the paper's Switch SAE, against weights and outputs saved by the code
    before routing became a strategy (bit-identical with the compiled kernels on the host that
    saved them; the tolerance covers other hosts' gemm rounding). That code weighted the balance
    loss against the MSE in the loss's own units: ``aux_units = loss``, and took the default lr
    law on the total width: ``lr_width = total``, did not clip the gradient: ``grad_clip = 0``, and had no
    router z-loss: ``z_loss_coeff = 0``."""
    ref = load_file(str(Path(__file__).parents[1] / "data" / "switch_top1_reference.safetensors"))
    acts = synthetic_activations(6000, 32, 512, 6, 0.05, 0)
    cfg = SAEConfig(arch="switch", d_model=32, width=256, k=8, n_experts=8, routing=RoutingConfig(aux_units="loss", z_loss_coeff=0.0))
    sae = ss.train(cfg, acts, ss.TrainConfig(steps=30, batch_size=256, normalize=True, log_every=10, matmul_dtype="float32",
                                                  lr_width="total", grad_clip=0.0),
                   progress=False)
    for name, tensor in sae.state_dict().items():
        torch.testing.assert_close(tensor, ref[f"w.{name}"], rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    out = sae(ref["x"])
    torch.testing.assert_close(out.x_hat, ref["x_hat"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sae.loss(ref["x"], out)["loss"].reshape(1), ref["loss"], rtol=1e-5, atol=0)


def test_top_e_routes_to_the_e_most_probable_experts(data):
    x, _ = data
    sae = make(STRATEGIES["top_e"])
    a = sae.route(x * sae.cfg.act_scale)
    assert a.token.numel() == 2 * T and sum(a.counts) == 2 * T
    chosen = torch.zeros(T, N, dtype=torch.bool)
    chosen[a.token, a.expert] = True
    assert torch.equal(chosen, torch.zeros(T, N, dtype=torch.bool).scatter(1, a.probs.topk(2, -1).indices, True))


def test_expert_choice_fills_every_expert_to_capacity_and_reports_unrouted_tokens(data):
    x, _ = data
    sae = make(RoutingConfig(router="expert_choice", capacity_factor=0.5))
    out = sae(x)
    a = out.extras["assignment"]
    assert a.counts == [8] * N  # ceil(0.5 * 64 / 4)
    for e in range(N):  # expert e holds the tokens it gives the highest probability
        mine = a.token[a.expert == e]
        assert set(mine.tolist()) == set(a.probs[:, e].topk(8).indices.tolist())
    unrouted = torch.ones(T, dtype=torch.bool)
    unrouted[a.token] = False
    assert sae.batch_stats(out)["unrouted"] == pytest.approx(unrouted.float().mean().item())
    torch.testing.assert_close(out.x_hat[unrouted], sae.b_pre.detach().expand(int(unrouted.sum()), D))
    sae.eval()  # inference routes like top-1: one entry per token
    assert sae(x).extras["assignment"].token.numel() == T


def test_hash_routing_follows_the_token_id_and_learns_no_router(data):
    x, ids = data
    sae = make(STRATEGIES["hash"])
    a = sae(x, token_ids=ids).extras["assignment"]
    assert torch.equal(a.expert[torch.argsort(a.token)], (ids * Hash.multiplier % 2**32) % N)
    assert sae.loss(x, sae(x, token_ids=ids)).keys() == {"mse", "loss"}
    with pytest.raises(ValueError, match="hash routing needs the token id"):
        sae(x)


def test_sinkhorn_balances_a_skewed_router_in_training_and_is_top1_at_inference(data):
    x, _ = data
    sae = make(STRATEGIES["sinkhorn"])
    with torch.no_grad():
        sae.W_router[0] += 5 * x.mean(0)  # most tokens prefer expert 0
    balanced = sae(x).extras["assignment"].counts
    sae.eval()
    greedy = sae(x).extras["assignment"].counts
    assert max(balanced) < max(greedy)
    assert max(balanced) - min(balanced) <= T // 4


@pytest.mark.parametrize("name", ["top1", "top_e"])
def test_balance_loss_is_one_for_a_uniform_router(name, data):
    x, _ = data
    sae = make(STRATEGIES[name])
    with torch.no_grad():
        sae.W_router.zero_()
    assert sae.loss(x, sae(x))["balance"].item() == pytest.approx(3.0)


def test_router_z_loss_is_the_mean_squared_logsumexp(data):
    x, _ = data
    sae = make(RoutingConfig(z_loss_coeff=0.5))
    out = sae(x)
    logits = out.extras["assignment"].logits
    torch.testing.assert_close(sae.loss(x, out)["z_loss"], 0.5 * torch.logsumexp(logits, -1).pow(2).mean())


def test_encoder_flops_scale_with_the_experts_a_token_runs_through():
    def encoder(routing: RoutingConfig) -> int:
        sae = make(routing)
        return sae.flops()["forward"] - 2 * D * N - 2 * K * D
    m = M // N
    assert encoder(RoutingConfig()) == 2 * D * m
    assert encoder(STRATEGIES["top_e"]) == 2 * encoder(RoutingConfig())
    assert make(STRATEGIES["shared"]).cfg.width == M + m and encoder(STRATEGIES["shared"]) == 2 * 2 * D * m
    assert make(STRATEGIES["hash"]).flops()["forward"] == 2 * D * m + 2 * K * D  # no router matmul


def test_steering_sends_every_token_to_one_expert(data):
    x, _ = data
    sae = make(RoutingConfig())
    code = sae.encode(x, expert=2)
    assert bool((code.indices[code.values != 0] // (M // N) == 2).all())
    with torch.no_grad():  # the expert's own TopK, scaled by the token's top-1 router probability
        pre = (x - sae.b_pre) @ sae.W_enc[2 * (M // N):3 * (M // N)].t()
        top_gate = torch.softmax((x - sae.b_router) @ sae.W_router.t(), dim=-1).max(-1).values
        want = pre.topk(K, dim=-1).values.relu() * top_gate[:, None]
    torch.testing.assert_close(code.values.sort(-1).values, want.sort(-1).values, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="expert 4 is out of range"):
        sae.encode(x, expert=4)


@pytest.mark.parametrize("settings, message", [
    (dict(router="nope"), "Unknown router 'nope'"),
    (dict(router="top_e", experts_per_token=5), "experts_per_token=5 exceeds n_experts 4"),
    (dict(experts_per_token=2), "needs router top_e"),
    (dict(router="expert_choice", capacity_factor=0), "capacity_factor must be a positive number"),
    (dict(arch="topk", n_experts=1, shared_expert=True),
     "routing settings \\(shared_expert\\) apply only to the switch architecture"),
    (dict(arch="relu", n_experts=1, auxk_coeff=0.1), "auxk_coeff needs a TopK code"),
])
def test_bad_routing_settings_are_refused_naming_the_setting(settings, message):
    with pytest.raises(ValueError, match=message):
        SAEConfig.from_flat(**{**dict(arch="switch", d_model=D, width=M, k=K, n_experts=N), **settings})


def test_hash_routing_on_activations_without_token_ids_is_refused_before_training(tmp_path):
    cfg = SAEConfig(arch="switch", d_model=D, width=M, k=K, n_experts=N, routing=RoutingConfig(router="hash"))
    with pytest.raises(ValueError, match="needs activations with stored token ids"):
        ss.train(cfg, torch.randn(512, D), ss.TrainConfig(steps=2, batch_size=64), run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_routing_settings_round_trip_through_cfg_json_and_old_files_still_load():
    cfg = SAEConfig(arch="switch", d_model=D, width=M + M // N, k=K, n_experts=N, routing=STRATEGIES["top_e+shared"])
    assert SAEConfig.from_dict(cfg.to_dict()) == cfg
    old = {key: value for key, value in SAEConfig(arch="switch", d_model=D, width=M, k=K, n_experts=N).to_dict().items()
           if key not in ("routing", "auxk_coeff", "auxk_k", "dead_tokens")}
    old["aux_coeff"] = 1.5  # where files from before the routing contract keep alpha
    assert SAEConfig.from_dict(old).routing == RoutingConfig(aux_coeff=1.5, aux_units="loss", z_loss_coeff=0.0)
    assert RoutingConfig().z_loss_coeff > 0  # what a new run gets: old files must not inherit it


def test_a_non_switch_sae_saved_with_other_routing_defaults_still_loads():
    """A TopK file written when the z-loss default was 0 names ``z_loss_coeff = 0``, which is not
    today's default; routing configures nothing there, so the file loads (and keeps refusing a
    routing setting passed to a new TopK SAE, above)."""
    saved = SAEConfig(arch="topk", d_model=D, width=M, k=K).to_dict()
    saved["routing"] = {**saved["routing"], "z_loss_coeff": 0.0, "aux_coeff": 0.1}
    assert SAEConfig.from_dict(saved) == SAEConfig(arch="topk", d_model=D, width=M, k=K)


def test_alpha_means_the_same_with_and_without_normalisation(data):
    """The same SAE on raw activations and on activations normalised by ``c``: with ``aux_units =
    data`` the whole loss scales by ``c²`` (the MSE does, and so the balance term), so training
    takes the same path either way; with the legacy ``loss`` units the balance term keeps its size."""
    x, _ = data
    c = 0.25
    losses = {}
    for name, units, scale in (("raw", "data", 1.0), ("normalised", "data", c), ("legacy", "loss", 1.0)):
        sae = make(RoutingConfig(aux_units=units), act_scale=scale, unit_scale=c)
        with torch.no_grad():
            sae.W_router.div_(scale)  # the same router probabilities on the scaled activations
        sae.init_from_data(x)
        losses[name] = sae.loss(x, sae(x))
    for term in ("mse", "balance", "loss"):
        torch.testing.assert_close(losses["normalised"][term], c**2 * losses["raw"][term])
    torch.testing.assert_close(losses["legacy"]["balance"], losses["raw"]["balance"] * c**2)
