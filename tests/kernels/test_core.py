"""The fused TopK-family core equals the dense reference: values and every gradient, whichever
outputs the upstream gradient reaches (compiled kernels and torch path)."""
from __future__ import annotations

import pytest
import torch

from switchsae.kernels.core import sparse_core
from switchsae.kernels.sparse import dense_codes

pytestmark = pytest.mark.usefixtures("kernel_backend")

# d = 200 exercises the 192-column register block, its tail and a non-multiple of 16; k = 6 the
# four-rows-at-a-time dots and their remainder
T, D, M, K = 40, 200, 64, 6


def _inputs(gen: torch.Generator, repeats: bool):
    """Scaled as in a real SAE (unit-norm rows): unscaled random weights make gradients of ~1e5
    whose fp32 rounding alone came within 25% of the tolerance (a test that failed 1 in ~10 runs)."""
    x = torch.randn(T, D, generator=gen, requires_grad=True)
    b = (0.1 * torch.randn(D, generator=gen)).requires_grad_()
    W_enc = torch.nn.functional.normalize(torch.randn(M, D, generator=gen), dim=1).requires_grad_()
    W_dec = torch.nn.functional.normalize(torch.randn(M, D, generator=gen), dim=1).requires_grad_()
    gate = torch.rand(T, generator=gen, requires_grad=True)
    indices = torch.rand(T, M, generator=gen).topk(K, dim=-1).indices
    if repeats:  # a latent named more than once in a row (as BatchTopK's padding entries do)
        indices[:, -2:] = 0
    return x, b, W_enc, W_dec, gate, indices


def _reference(x, b, W_enc, W_dec, gate, indices):
    """Dense: the selected pre-activations by a gather, decoder and loss by plain matmuls."""
    v = torch.einsum("tkd,td->tk", W_enc[indices], x - b)
    z = torch.relu(v) * (1 if gate is None else gate[:, None] if gate.ndim == 1 else gate)
    x_hat = dense_codes(z, indices, M) @ W_dec + b
    return z, x_hat, (x_hat - x).pow(2).sum(-1).mean()


@pytest.mark.parametrize("upstream", ["mse", "x_hat", "z", "all"])
@pytest.mark.parametrize("gated", [None, "token", "entry"], ids=["topk", "gate-per-token", "gate-per-entry"])
@pytest.mark.parametrize("sparse_grad", [False, True], ids=["dense-grad", "sparse-grad"])
@pytest.mark.parametrize("placed", [False, True], ids=["in-order", "placed-and-scaled"])
def test_sparse_core_equals_dense_reference(upstream, gated, sparse_grad, placed):
    """``placed``: x̂ written to permuted rows and scaled, as a Switch SAE asks for."""
    gen = torch.Generator().manual_seed(0)
    x, b, W_enc, W_dec, gate, indices = _inputs(gen, repeats=upstream == "all")
    gate = {None: None, "token": gate, "entry": torch.rand(T, K, generator=gen, requires_grad=True)}[gated]
    g_x_hat, g_z = torch.randn(T, D, generator=gen), torch.randn(T, K, generator=gen)
    with torch.no_grad():  # random weights: about half the selected latents are below zero (no ReLU gradient)
        values = torch.einsum("tkd,td->tk", W_enc[indices], x - b)

    def objective(z, x_hat, mse):
        terms = {"mse": mse, "x_hat": (x_hat * g_x_hat).sum(), "z": (z * g_z).sum()}
        return sum(terms.values()) if upstream == "all" else terms[upstream]

    inputs = [t for t in (x, b, W_enc, W_dec, gate) if t is not None]
    with torch.no_grad():
        centred = x - b
    rows, x_hat_scale = (torch.randperm(T, generator=gen), 0.5) if placed else (None, 1.0)
    out = sparse_core(x, b, W_enc, W_dec, indices, values, centred, gate, sparse_grad, rows, x_hat_scale)
    z, x_hat, mse = _reference(x, b, W_enc, W_dec, gate, indices)
    if placed:
        x_hat = torch.zeros_like(x_hat).index_add(0, rows, x_hat * x_hat_scale)
    ref = z, x_hat, mse
    for got, want in zip(out, ref):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    grads = torch.autograd.grad(objective(*out), inputs, allow_unused=True)
    ref_grads = torch.autograd.grad(objective(*ref), inputs, allow_unused=True)  # z does not reach W_dec
    for name, got, want, tensor in zip(["x", "b", "W_enc", "W_dec", "gate"], grads, ref_grads, inputs):
        got = torch.zeros_like(tensor) if got is None else got.to_dense() if got.is_sparse else got
        want = torch.zeros_like(tensor) if want is None else want
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3, msg=lambda m, name=name: f"{name}: {m}")


def test_sparse_core_without_grad_needs_no_value_gradients():
    gen = torch.Generator().manual_seed(1)
    x, b, W_enc, W_dec, _, indices = _inputs(gen, repeats=False)
    with torch.no_grad():
        values = torch.einsum("tkd,td->tk", W_enc[indices], x - b)
        z, x_hat, mse = sparse_core(x, b, W_enc, W_dec, indices, values, x - b)
        ref = _reference(x, b, W_enc, W_dec, None, indices)
    torch.testing.assert_close(x_hat, ref[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mse, ref[2], rtol=1e-4, atol=1e-4)


def test_sparse_core_skips_the_value_gradients_when_no_backward_can_follow(monkeypatch):
    from switchsae.kernels import core

    calls = []
    decode = core.decode_residual

    def recording(z, indices, W, b, x, value_grads, *placement):
        calls.append(value_grads)
        return decode(z, indices, W, b, x, value_grads, *placement)

    monkeypatch.setattr(core, "decode_residual", recording)
    gen = torch.Generator().manual_seed(2)
    x, b, W_enc, W_dec, _, indices = _inputs(gen, repeats=False)
    values = torch.einsum("tkd,td->tk", W_enc[indices], x - b).detach()
    sparse_core(x, b, W_enc, W_dec, indices, values, (x - b).detach())
    with torch.no_grad():  # parameters still require grad, but evaluation needs no backward
        sparse_core(x, b, W_enc, W_dec, indices, values, (x - b).detach())
    assert calls == [True, False]
