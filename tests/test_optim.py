"""Row-sparse gradients and LazyAdam against their dense references (torch's Adam, and the decoder's
projection and renormalisation written out)."""
from __future__ import annotations

import pytest
import torch

from switchsae.config import SAEConfig
from switchsae.optim import BFloat16Copy, LazyAdam
from switchsae.saes import build_sae

pytestmark = pytest.mark.usefixtures("kernel_backend")


def _grads(arch: str, sparse: bool, x: torch.Tensor) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    cfg = SAEConfig(arch=arch, d_model=16, width=64, k=4, n_experts=4 if arch == "switch" else 1)
    sae = build_sae(cfg)
    sae.sparse_grads = sparse
    sae.loss(x, sae(x))["loss"].backward()
    return {n: (p.grad.to_dense() if p.grad.is_sparse else p.grad) for n, p in sae.named_parameters()}


@pytest.mark.parametrize("arch", ["topk", "switch", "batchtopk"])
def test_row_sparse_gradients_equal_dense_ones(arch):
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(1)) * 3
    dense, sparse = _grads(arch, False, x), _grads(arch, True, x)
    for name in dense:
        torch.testing.assert_close(sparse[name], dense[name], rtol=1e-5, atol=1e-6, msg=name)


def test_lazy_adam_equals_adam_when_every_row_has_a_gradient():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(6, 3))
    b = torch.nn.Parameter(a.detach().clone())
    ref, lazy = torch.optim.Adam([a], lr=0.1), LazyAdam([b], lr=0.1)
    for _ in range(5):
        g = torch.randn(6, 3)
        a.grad = g.clone()
        b.grad = g.to_sparse(sparse_dim=1)
        ref.step()
        lazy.step()
    torch.testing.assert_close(a, b)


def test_lazy_adam_leaves_untouched_rows_and_their_moments_alone():
    p = torch.nn.Parameter(torch.randn(6, 3))
    before = p.detach().clone()
    opt = LazyAdam([p], lr=0.1)
    p.grad = torch.sparse_coo_tensor(torch.tensor([[1, 4]]), torch.ones(2, 3), (6, 3), check_invariants=True)
    opt.step()
    untouched = [0, 2, 3, 5]
    assert torch.equal(p[untouched], before[untouched])
    assert not torch.equal(p[[1, 4]], before[[1, 4]])
    assert torch.equal(opt.state[p]["exp_avg"][untouched], torch.zeros(4, 3))


def test_lazy_adam_with_dense_gradients_is_adam():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(6, 3))
    b = torch.nn.Parameter(a.detach().clone())
    bias_a = torch.nn.Parameter(torch.randn(3))
    bias_b = torch.nn.Parameter(bias_a.detach().clone())
    ref, ours = torch.optim.Adam([a, bias_a], lr=0.1), LazyAdam([b, bias_b], lr=0.1)
    for _ in range(5):
        g, g_bias = torch.randn(6, 3), torch.randn(3)
        a.grad, b.grad, bias_a.grad, bias_b.grad = g.clone(), g.clone(), g_bias.clone(), g_bias.clone()
        ref.step()
        ours.step()
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(bias_a, bias_b)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense grad", "row-sparse grad"])
def test_unit_norm_rows_group_projects_steps_and_renormalises(sparse):
    gen = torch.Generator().manual_seed(0)
    w = torch.nn.functional.normalize(torch.randn(8, 5, generator=gen), dim=1)
    rows = torch.arange(8) if not sparse else torch.tensor([0, 3, 6])
    ref = torch.nn.Parameter(w[rows].clone())
    ours = torch.nn.Parameter(w.clone())
    ref_opt = torch.optim.Adam([ref], lr=0.05)
    opt = LazyAdam([{"params": [ours], "unit_norm_rows": True}], lr=0.05)
    for _ in range(4):
        g = torch.randn(rows.numel(), 5, generator=gen)
        with torch.no_grad():
            ref.grad = g - (g * ref).sum(1, keepdim=True) * ref
        ref_opt.step()
        with torch.no_grad():
            ref.div_(ref.norm(dim=1, keepdim=True))
        ours.grad = torch.sparse_coo_tensor(rows[None], g, (8, 5), check_invariants=True) if sparse else g
        opt.step()
    torch.testing.assert_close(ours[rows], ref)
    torch.testing.assert_close(ours.norm(dim=1), torch.ones(8))


def test_unit_norm_rows_group_rejects_vectors():
    opt = LazyAdam([{"params": [torch.nn.Parameter(torch.ones(4))], "unit_norm_rows": True}])
    with pytest.raises(ValueError, match="must hold matrices"):
        opt.step()


@pytest.mark.parametrize("sparse", [False, True], ids=["dense grad", "row-sparse grad"])
def test_bf16_copy_stays_equal_to_a_fresh_cast_without_recasting(sparse):
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8, 5, generator=gen))
    copy = BFloat16Copy(p)
    opt = LazyAdam([{"params": [p], "low_precision_copy": copy}], lr=0.05)
    first = copy.get()
    rows = torch.tensor([1, 4, 6])
    for _ in range(3):
        g = torch.randn(3, 5, generator=gen)
        p.grad = torch.sparse_coo_tensor(rows[None], g, (8, 5), check_invariants=True) if sparse else torch.randn(8, 5)
        opt.step()
        assert copy.current(), "the optimizer's update kept the copy current"
        assert copy.get() is first, "no cast of the whole matrix"
        assert torch.equal(first, p.detach().to(torch.bfloat16))


def test_bf16_copy_is_recast_after_a_change_the_optimizer_did_not_make():
    p = torch.nn.Parameter(torch.randn(8, 5))
    copy = BFloat16Copy(p)
    opt = LazyAdam([{"params": [p], "low_precision_copy": copy}], lr=0.05)
    copy.get()
    with torch.no_grad():
        p.mul_(2)  # e.g. a load or an edit: bumps the version counter
    assert not copy.current()
    p.grad = torch.randn(8, 5)
    opt.step()  # a stale copy is not patched row by row
    assert not copy.current()
    assert torch.equal(copy.get(), p.detach().to(torch.bfloat16))
