"""The optional encoder bias of the TopK family (``encoder_bias``): codes and every gradient equal
a dense reference, a zero bias changes no code, and without the option nothing changes at all
(no ``b_enc`` in the state dict, the fused path). AuxK with the bias: tests/saes/test_auxk.py."""
from __future__ import annotations

import pytest
import torch

from switchsae.config import SAEConfig
from switchsae.saes import build_sae
from switchsae.saes.io import load_sae, save_sae

pytestmark = pytest.mark.usefixtures("kernel_backend")

D, M, K, T, SCALE = 16, 64, 4, 64, 0.7


def make(arch: str, bias: bool = True):
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(arch=arch, d_model=D, width=M, k=K, encoder_bias=bias, act_scale=SCALE))
    if bias:
        with torch.no_grad():
            sae.b_enc.copy_(torch.randn(M) * 0.5)
    return sae


def inputs() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(T, D, generator=gen) + 0.5


def dense_pre(sae, x: torch.Tensor) -> torch.Tensor:
    """``W_enc (s·x − b_pre) + b_enc`` for every latent, ``[T, M]``."""
    return (x * SCALE - sae.b_pre) @ sae.W_enc.t() + sae.b_enc


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_codes_and_every_gradient_equal_a_dense_reference(arch):
    sae, x = make(arch), inputs()
    sae.init_from_data(x)
    out = sae(x)
    sae.loss(x, out)["loss"].backward()
    grads = {name: p.grad.clone() for name, p in sae.named_parameters()}
    sae.zero_grad(set_to_none=True)
    pre = dense_pre(sae, x)
    mask = out.latents.to_dense(M) != 0
    if arch == "topk":  # the k largest pre-activations of each token
        assert torch.equal(mask, torch.zeros_like(mask).scatter(1, pre.topk(K).indices, True) & (pre > 0))
    else:  # the T·k largest of the batch
        assert torch.equal(mask, (pre >= pre.flatten().topk(T * K).values[-1]) & (pre > 0))
    z = pre.relu() * mask
    torch.testing.assert_close(out.latents.to_dense(M), z.detach())
    x_hat = (z @ sae.W_dec + sae.b_pre) / SCALE
    torch.testing.assert_close(out.x_hat, x_hat.detach())
    ((x * SCALE - x_hat * SCALE).pow(2).sum(-1).mean()).backward()
    assert set(grads) == {"W_enc", "W_dec", "b_pre", "b_enc"}
    assert grads["b_enc"].abs().sum() > 0
    for name, param in sae.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_bf16_selection_keeps_exact_fp32_values_with_the_bias(arch):
    sae, x = make(arch), inputs()
    sae.matmul_dtype = torch.bfloat16
    latents = sae.eval().encode(x)
    exact = dense_pre(sae, x).detach().gather(1, latents.indices).relu()
    torch.testing.assert_close(latents.values, exact * (latents.values != 0))


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_a_zero_bias_gives_the_codes_of_the_sae_without_one(arch):
    with_bias, without, x = make(arch), make(arch, bias=False), inputs()
    with torch.no_grad():
        with_bias.b_enc.zero_()
    assert "b_enc" not in without.state_dict() and without.b_enc is None
    for sae in (with_bias, without):
        sae.init_from_data(x)
    a, b = with_bias(x), without(x)
    assert torch.equal(a.latents.values, b.latents.values) and torch.equal(a.latents.indices, b.latents.indices)
    torch.testing.assert_close(a.x_hat, b.x_hat)
    assert a.mse is None and b.mse is not None  # the bias takes the unfused path


def test_the_bias_is_saved_and_loaded(tmp_path):
    sae, x = make("topk").eval(), inputs()
    loaded = load_sae(save_sae(sae, tmp_path / "run"))
    assert loaded.cfg.encoder_bias and torch.equal(loaded.b_enc, sae.b_enc)
    assert torch.equal(loaded(x).x_hat, sae(x).x_hat)


@pytest.mark.parametrize("arch", ["relu", "switch"])
def test_other_architectures_refuse_the_option(arch):
    with pytest.raises(ValueError, match="encoder_bias applies only to the topk and batchtopk"):
        SAEConfig(arch=arch, d_model=D, width=M, k=K, n_experts=4 if arch == "switch" else 1, encoder_bias=True)
