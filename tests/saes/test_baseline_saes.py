"""ReLU, Gated, JumpReLU and BatchTopK SAEs against their papers' equations."""
from __future__ import annotations

import torch


def _perturb(sae, scale: float = 0.1) -> None:
    """Move every parameter off its (often zero) initial value so that each path matters."""
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for param in sae.parameters():
            param.add_(scale * torch.randn(param.shape, generator=gen))


def test_relu_init_code_and_norm_weighted_l1(make_sae, batch):
    sae = make_sae("relu")
    assert not sae.unit_norm_decoder
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.full((sae.cfg.width,), 0.1))
    assert torch.equal(sae.W_enc, sae.W_dec) and not sae.b_enc.any()
    _perturb(sae)
    out = sae(batch)
    z = torch.relu((batch - sae.b_pre) @ sae.W_enc.t() + sae.b_enc)
    torch.testing.assert_close(out.latents.values, z)
    expected = sae.cfg.l1_coeff * (z * sae.W_dec.norm(dim=1)).sum(-1).mean()
    torch.testing.assert_close(sae.loss(batch, out)["l1"], expected)


def test_gated_code_uses_the_row_scaled_magnitude_matrix(make_sae, batch):
    sae = make_sae("gated")
    _perturb(sae)
    centred = batch - sae.b_pre
    gate = centred @ sae.W_enc.t() + sae.b_enc
    W_mag = sae.r_mag.exp()[:, None] * sae.W_enc
    expected = (gate > 0) * torch.relu(centred @ W_mag.t() + sae.b_mag)
    torch.testing.assert_close(sae(batch).latents.values, expected)


def test_gated_aux_recon_does_not_train_the_decoder_and_mse_does_not_train_the_gate(make_sae, batch):
    sae = make_sae("gated")
    _perturb(sae)
    losses = sae.loss(batch, sae(batch))
    losses["aux_recon"].backward(retain_graph=True)
    assert sae.W_dec.grad is None and sae.W_enc.grad.abs().sum() > 0
    sae.zero_grad(set_to_none=True)
    losses["mse"].backward()
    assert sae.b_enc.grad is None  # the gate bias reaches x̂ only through the Heaviside
    assert sae.r_mag.grad.abs().sum() > 0 and sae.W_dec.grad.abs().sum() > 0


def test_jumprelu_code_and_straight_through_threshold_gradients(make_sae, batch):
    sae = make_sae("jumprelu", jump_threshold=0.2, l1_coeff=0.5)
    _perturb(sae, 0.01)
    eps, lam, T = sae.cfg.jump_bandwidth, sae.cfg.l1_coeff, batch.shape[0]
    theta = sae.log_threshold.detach().exp()
    pre = ((batch - sae.b_pre) @ sae.W_enc.t() + sae.b_enc).detach()
    window = ((pre - theta).abs() < eps / 2).float() / eps  # (1/ε) K((pre − θ)/ε)
    assert window.sum() > 0
    out = sae(batch)
    torch.testing.assert_close(out.latents.values, pre * (pre > theta))

    losses = sae.loss(batch, out)
    losses["l0"].backward(retain_graph=True)
    expected_l0 = -lam / T * window.sum(0) * theta  # ∂/∂θ times dθ/dlog θ = θ
    torch.testing.assert_close(sae.log_threshold.grad, expected_l0)

    sae.zero_grad(set_to_none=True)
    losses["mse"].backward()
    z = (pre * (pre > theta)).requires_grad_()
    mse = (batch - (z @ sae.W_dec + sae.b_pre)).pow(2).sum(-1).mean()
    (grad_z,) = torch.autograd.grad(mse, z)
    expected_mse = (grad_z * -theta * window).sum(0) * theta
    torch.testing.assert_close(sae.log_threshold.grad, expected_mse)


def test_batchtopk_training_keeps_the_batch_top_t_times_k(make_sae, batch):
    sae = make_sae("batchtopk")
    sae.init_from_data(batch)
    out = sae(batch)
    T, k = batch.shape[0], sae.cfg.k
    acts = torch.relu((batch - sae.b_pre) @ sae.W_enc.t()).detach()
    assert int(out.latents.l0().sum()) == T * k
    assert out.latents.values.shape[1] == int(out.latents.l0().max())
    kept = out.latents.values[out.latents.values != 0].detach().sort().values
    torch.testing.assert_close(kept, acts.flatten().topk(T * k).values.sort().values)
    assert sae.threshold.item() == kept.min().item()  # the first batch sets it directly
    assert "threshold" in sae.state_dict()
    first = sae.threshold.clone()
    values = sae(batch.flip(0) * 2).latents.values
    decay = sae.threshold_decay
    torch.testing.assert_close(sae.threshold, decay * first + (1 - decay) * values[values > 0].min())


def test_batchtopk_bf16_selection_keeps_fp32_values(make_sae, batch):
    sae = make_sae("batchtopk")
    sae.matmul_dtype = torch.bfloat16
    latents = sae(batch).latents
    assert latents.values.dtype == torch.float32
    exact = torch.relu((batch - sae.b_pre) @ sae.W_enc.t()).gather(1, latents.indices)
    torch.testing.assert_close(latents.values, exact * (latents.values != 0))


def test_batchtopk_gradients_equal_a_dense_masked_reference(make_sae, batch):
    """Padding (value 0, index 0) must not leak gradient into latent 0."""
    sae = make_sae("batchtopk")
    sae.init_from_data(batch)
    out = sae(batch)
    sae.loss(batch, out)["loss"].backward()
    grads = {name: p.grad.clone() for name, p in sae.named_parameters()}
    sae.zero_grad(set_to_none=True)
    mask = out.latents.to_dense(sae.cfg.width) != 0
    z = torch.relu((batch - sae.b_pre) @ sae.W_enc.t()) * mask
    (batch - (z @ sae.W_dec + sae.b_pre)).pow(2).sum(-1).mean().backward()
    for name, param in sae.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, msg=name)


def test_batchtopk_inference_uses_the_threshold(make_sae, batch):
    sae = make_sae("batchtopk")
    sae.init_from_data(batch)
    sae(batch)
    sae(batch + 0.1)
    assert sae.threshold > 0
    sae.eval()
    threshold = sae.threshold.clone()
    latents = sae.encode(batch)
    assert torch.equal(sae.threshold, threshold)  # inference leaves the estimate alone
    acts = torch.relu((batch - sae.b_pre) @ sae.W_enc.t()).detach()
    torch.testing.assert_close(latents.to_dense(sae.cfg.width), acts * (acts > threshold))
    torch.testing.assert_close(sae(batch[:5]).x_hat, sae(batch).x_hat[:5])  # no batch dependence
