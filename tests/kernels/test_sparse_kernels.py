"""The sparse encoder/decoder kernels equal dense references, values and gradients."""
from __future__ import annotations

import pytest
import torch

from switchsae.kernels.sparse import dense_codes, select_topk, sparse_decode, topk_encode

pytestmark = pytest.mark.usefixtures("kernel_backend")

T, D, M, K = 48, 16, 64, 5


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _distinct_indices(gen: torch.Generator, tokens: int = T, width: int = M, k: int = K) -> torch.Tensor:
    return torch.rand(tokens, width, generator=gen).topk(k, dim=-1).indices


@pytest.mark.parametrize("sparse_grad", [False, True])
@pytest.mark.parametrize("repeats", [False, True], ids=["distinct", "repeated-indices"])
def test_sparse_decode_equals_dense_matmul(gen, sparse_grad, repeats):
    """Values and gradients, also where a row names a latent twice (padding entries do)."""
    values = torch.randn(T, K, generator=gen, requires_grad=True)
    W_dec = torch.randn(M, D, generator=gen, requires_grad=True)
    indices = _distinct_indices(gen)
    if repeats:
        indices[:, -2:] = indices[:, :1]
    upstream = torch.randn(T, D, generator=gen)

    out = sparse_decode(values, indices, W_dec, sparse_grad)
    grads = torch.autograd.grad((out * upstream).sum(), (values, W_dec))
    ref = dense_codes(values, indices, M) @ W_dec
    ref_grads = torch.autograd.grad((ref * upstream).sum(), (values, W_dec))

    torch.testing.assert_close(out, ref)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.to_dense(), want)


def test_sparse_decode_with_more_slots_per_row_than_latents(gen):
    """AuxK pads ``k_aux`` slots per token, which may exceed a small SAE's (or expert shard's) rows."""
    values = torch.randn(T, 12, generator=gen, requires_grad=True)
    W_dec = torch.randn(8, D, generator=gen, requires_grad=True)
    indices = torch.randint(0, 8, (T, 12), generator=gen)
    upstream = torch.randn(T, D, generator=gen)
    grads = torch.autograd.grad((sparse_decode(values, indices, W_dec, True) * upstream).sum(), (values, W_dec))
    ref_grads = torch.autograd.grad(((dense_codes(values, indices, 8) @ W_dec) * upstream).sum(), (values, W_dec))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.to_dense(), want)


@pytest.mark.parametrize("x_needs_grad", [True, False], ids=["x-grad", "data-x"])
def test_topk_encode_and_decode_equal_a_dense_reference(gen, x_needs_grad):
    """Values and gradients of x, b, W_enc, W_dec; without an x gradient b's takes the row-sum path."""
    x = torch.randn(T, D, generator=gen, requires_grad=x_needs_grad)
    b = torch.randn(D, generator=gen, requires_grad=True)
    W_enc = torch.randn(M, D, generator=gen, requires_grad=True)
    W_dec = torch.randn(M, D, generator=gen, requires_grad=True)
    upstream = torch.randn(T, D, generator=gen)
    params = (x, b, W_enc, W_dec) if x_needs_grad else (b, W_enc, W_dec)

    values, indices = select_topk((x - b).detach(), W_enc, K)
    pre = (x - b) @ W_enc.t()
    torch.testing.assert_close(values.sort(-1).values, pre.topk(K, dim=-1).values.sort(-1).values)
    z = topk_encode(x, b, W_enc, indices, values)
    out = sparse_decode(z, indices, W_dec)
    grads = torch.autograd.grad((out * upstream).sum(), params)

    mask = dense_codes(torch.ones_like(values), indices, M)
    ref = (torch.relu(pre) * mask) @ W_dec
    ref_grads = torch.autograd.grad((ref * upstream).sum(), params)

    torch.testing.assert_close(out, ref)
    for got, want in zip(grads, ref_grads):  # sums in another order: fp32 rounding apart
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bf16_selection_picks_nearly_the_same_latents_with_fp32_exact_values(gen):
    x = torch.randn(256, 64, generator=gen)
    W = torch.randn(512, 64, generator=gen)
    _, idx32 = select_topk(x, W, 16)
    values, idx16 = select_topk(x, W, 16, W.to(torch.bfloat16))
    assert values.dtype == torch.float32
    same = (idx16[:, :, None] == idx32[:, None, :]).any(-1).float().mean()
    assert same > 0.9
    torch.testing.assert_close(values, (x @ W.t()).gather(1, idx16))


def test_padding_entries_leave_a_real_latent_zero_intact():
    """A padded code (value 0, index 0) next to a real latent 0 densifies to the real value."""
    values = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    indices = torch.tensor([[0, 0, 0], [0, 1, 0]])
    assert torch.equal(dense_codes(values, indices, 4), torch.tensor([[2.0, 0, 0, 0], [0, 3.0, 0, 0]]))
