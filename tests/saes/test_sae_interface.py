"""Every architecture in the registry honours the one SAE interface (a new one is covered automatically)."""
from __future__ import annotations

import pytest
import torch

from switchsae.config import TrainConfig
from switchsae.saes import REGISTRY
from switchsae.saes.io import (CFG_FILE, LEGACY_CFG_FILE, LEGACY_WEIGHTS_FILE, WEIGHTS_FILE, load_sae, read_cfg_dict,
                               save_sae)
from switchsae.train import optimizer_for

ARCHS = sorted(REGISTRY)
UNIT_NORM_ARCHS = [a for a in ARCHS if REGISTRY[a].unit_norm_decoder]
PER_TOKEN_TOPK = ["switch", "topk"]

# FLOPs per token, (forward, train), written out from SPEC §2 independently of the code: a dense
# matmul's backward costs twice its forward; the sparse encoder gather and decoder of the TopK
# family cost 2kd forward and 4kd backward each; the selection matmul has no backward.
EXPECTED_FLOPS = {
    "topk": lambda d, M, k, N: (2 * d * M + 2 * k * d, 2 * d * M + 12 * k * d),
    "batchtopk": lambda d, M, k, N: (2 * d * M + 2 * k * d, 2 * d * M + 12 * k * d),
    "switch": lambda d, M, k, N: (2 * d * N + 2 * d * M // N + 2 * k * d, 6 * d * N + 2 * d * M // N + 12 * k * d),
    "relu": lambda d, M, k, N: (4 * d * M, 12 * d * M),
    "jumprelu": lambda d, M, k, N: (4 * d * M, 12 * d * M),
    "gated": lambda d, M, k, N: (4 * d * M, 16 * d * M),  # + aux recon: 2dM forward, 2dM backward
}


@pytest.mark.parametrize("arch", ARCHS)
def test_shapes_and_encode_decode_agree_with_forward(arch, make_sae, batch):
    sae = make_sae(arch)
    out = sae(batch)
    T, M = batch.shape[0], sae.cfg.width
    assert out.x_hat.shape == batch.shape and out.x_hat.dtype == torch.float32
    latents = out.latents
    if latents.indices is None:
        assert latents.values.shape == (T, M)
    else:
        assert latents.values.shape == latents.indices.shape and latents.values.shape[0] == T
        assert 0 <= int(latents.indices.min()) and int(latents.indices.max()) < M
    assert latents.to_dense(M).shape == (T, M)
    sae.eval()  # BatchTopK: encode and forward must see the same (inference) rule
    torch.testing.assert_close(sae.decode(sae.encode(batch)), sae(batch).x_hat)


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_is_finite_and_gradients_reach_every_parameter(arch, make_sae, batch):
    sae = make_sae(arch)
    sae.init_from_data(batch)
    losses = sae.loss(batch, sae(batch))
    assert all(torch.isfinite(v) for v in losses.values())
    torch.testing.assert_close(losses["loss"], sum(v for name, v in losses.items() if name != "loss"))
    losses["loss"].backward()
    for name, param in sae.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, f"{arch}: no gradient reaches {name}"


@pytest.mark.parametrize("arch", ARCHS)
def test_flops_match_the_spec_formulas(arch, make_sae):
    assert arch in EXPECTED_FLOPS, f"add the FLOP formula of {arch} to this test"
    cfg = make_sae(arch).cfg
    for changes in ({}, {"d_model": 24, "width": 128, "k": 8}):
        cfg_ = cfg.replace(**changes)
        forward, train = EXPECTED_FLOPS[arch](cfg_.d_model, cfg_.width, cfg_.k, cfg_.n_experts)
        assert REGISTRY[arch](cfg_).flops() == {"forward": forward, "train": train}


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip_is_bitwise(arch, make_sae, batch, tmp_path):
    sae = make_sae(arch)
    sae.init_from_data(batch)
    sae(batch)  # a training-mode forward fills running state (BatchTopK's threshold)
    with torch.no_grad():
        for param in sae.parameters():
            param.add_(0.01 * torch.randn_like(param))
    loaded = load_sae(save_sae(sae, tmp_path / "sae"))
    assert loaded.cfg == sae.cfg and not loaded.training  # loaded for use: eval mode
    for name, tensor in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    for training in (False, True):
        sae.train(training)
        loaded.train(training)
        assert torch.equal(loaded(batch).x_hat, sae(batch).x_hat)


def test_a_run_folder_in_the_legacy_layout_still_loads(make_sae, batch, tmp_path):
    """Runs saved before the rename hold our schema under SAELens's names, cfg.json + sae_weights.safetensors."""
    sae = make_sae("switch", act_scale=2.5)
    folder = save_sae(sae, tmp_path / "old")
    (folder / CFG_FILE).rename(folder / LEGACY_CFG_FILE)
    (folder / WEIGHTS_FILE).rename(folder / LEGACY_WEIGHTS_FILE)
    loaded = load_sae(folder)
    assert loaded.cfg == sae.cfg
    assert torch.equal(loaded(batch).x_hat, sae(batch).x_hat)
    save_sae(loaded, folder)  # saving again writes the new names, which then take precedence
    assert (folder / CFG_FILE).is_file() and read_cfg_dict(folder) == sae.cfg.to_dict()


def test_a_saelens_folder_is_pointed_at_switchsae_import(tmp_path):
    (tmp_path / LEGACY_CFG_FILE).write_text('{"architecture": "topk", "d_in": 16, "d_sae": 64}')
    with pytest.raises(ValueError, match="holds a SAELens SAE; convert it with `switchsae import"):
        load_sae(tmp_path)


@pytest.mark.parametrize("arch", UNIT_NORM_ARCHS)
def test_unit_norm_decoder_rows_stay_unit_norm_through_training_steps(arch, make_sae, batch):
    sae = make_sae(arch)
    ones = torch.ones(sae.cfg.width)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), ones)
    opt = optimizer_for(sae, TrainConfig())
    for group in opt.param_groups:
        group["lr"] = 1e-2
    for _ in range(3):
        opt.zero_grad()
        sae.loss(batch, sae(batch))["loss"].backward()
        opt.step()
        torch.testing.assert_close(sae.W_dec.norm(dim=1), ones)
    assert [group.get("unit_norm_rows", False) for group in sae.param_groups()] == [False, True]


@pytest.mark.parametrize("arch", ["batchtopk", "switch", "topk"])
def test_bf16_selection_reads_a_copy_the_optimizer_keeps_current(arch, make_sae, batch):
    sae = make_sae(arch)
    sae.matmul_dtype = torch.bfloat16
    opt = optimizer_for(sae, TrainConfig())
    for group in opt.param_groups:
        group["lr"] = 1e-2
    copy = sae.selection_weights()
    for _ in range(3):
        opt.zero_grad()
        sae.loss(batch, sae(batch))["loss"].backward()
        opt.step()
        assert sae.selection_weights() is copy, "updated row by row, not cast again"
        assert torch.equal(copy, sae.W_enc.detach().to(torch.bfloat16))
    sae.load_state_dict({name: t + 1 for name, t in sae.state_dict().items()})
    assert torch.equal(sae.selection_weights(), sae.W_enc.detach().to(torch.bfloat16)), "a load is noticed"


@pytest.mark.parametrize("arch", PER_TOKEN_TOPK)
def test_per_token_topk_l0_at_most_k(arch, make_sae, batch):
    sae = make_sae(arch)
    l0 = sae(batch).latents.l0()
    assert l0.shape == (batch.shape[0],) and int(l0.max()) <= sae.cfg.k
