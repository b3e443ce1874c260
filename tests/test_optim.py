"""Row-sparse gradients and LazyAdam against their dense references (torch's Adam, and the decoder's
projection and renormalisation written out)."""
from __future__ import annotations

import pytest
import torch

from switchsae.config import SAEConfig
from switchsae.optim import BFloat16Copy, LazyAdam, clip_scale, rounding_keys, squared_norm, stochastic_round_bf16
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


def _adam_run(moments: str, steps: int, sparse_rows: torch.Tensor | None = None, lr: float = 1e-2):
    """LazyAdam on one [32, 16] matrix for ``steps`` seeded random gradients (row-sparse on
    ``sparse_rows`` if given); the parameter and its optimizer state."""
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(32, 16, generator=gen))
    opt = LazyAdam([p], lr=lr, moments=moments)
    for _ in range(steps):
        g = torch.randn(32, 16, generator=gen) * 10 ** torch.randn(32, 1, generator=gen)  # rows of varied scale
        p.grad = g if sparse_rows is None else torch.sparse_coo_tensor(
            sparse_rows[None], g[sparse_rows], (32, 16), check_invariants=True)
        opt.step()
    return p.detach(), opt.state[p]


def test_bf16_moments_stay_close_to_fp32_adam_over_50_steps():
    """Each stored moment is within one bf16 ulp (2^-7 relative) of its fp32 update, and each step
    moves a weight by about lr at most; were every step's error the largest and of one sign the
    weights would drift 50 · lr · 2^-7 ≈ 0.004 apart in 50 steps. Unbiased rounding keeps them
    inside that bound. The rounding errors of v (a sum of positive terms, so no cancellation) add up
    like a random walk, sqrt(50) · 2^-7 / sqrt(3) ≈ 3% relative: 12% allows four times that."""
    p32, state32 = _adam_run("fp32", 50)
    p16, state16 = _adam_run("bf16", 50)
    assert state16["exp_avg"].dtype == state16["exp_avg_sq"].dtype == torch.bfloat16
    torch.testing.assert_close(p16, p32, rtol=0, atol=50 * 1e-2 * 2**-7)
    torch.testing.assert_close(state16["exp_avg_sq"].float(), state32["exp_avg_sq"], rtol=0.12, atol=0)
    assert not torch.equal(p16, p32)


def test_bf16_moments_keep_fp32_for_vectors():
    bias = torch.nn.Parameter(torch.zeros(5))
    opt = LazyAdam([bias], moments="bf16")
    bias.grad = torch.ones(5)
    opt.step()
    assert opt.state[bias]["exp_avg"].dtype == opt.state[bias]["exp_avg_sq"].dtype == torch.float32


def test_stochastic_rounding_is_unbiased_and_deterministic():
    """A value 30% of the way from one bf16 number to the next rounds up 30% of the time: the mean of
    200,000 roundings (one key each) is the value within 6 standard errors (2^-7·sqrt(0.21/2e5) each);
    round-to-nearest would give the lower neighbour every time."""
    keys = rounding_keys(7, torch.arange(200_000), 0)
    for value in (1 + 0.3 * 2**-7, -(1 + 0.3 * 2**-7), 2**-19 * (1 + 0.3 * 2**-7)):
        x = torch.full((200_000,), value)
        rounded = stochastic_round_bf16(x, keys)
        low = torch.tensor(value).to(torch.bfloat16).float()  # 0.3 of an ulp: round-to-nearest gives the lower
        assert set(rounded.float().abs().unique().tolist()) <= {abs(low.item()), abs(low.item()) * (1 + 2**-7)}
        assert rounded.float().double().mean().item() == pytest.approx(value, abs=6 * abs(value) * 2**-7 * 1.03e-3)
        assert torch.equal(stochastic_round_bf16(x, keys).view(torch.int16), rounded.view(torch.int16))
        assert not torch.equal(stochastic_round_bf16(x, rounding_keys(8, torch.arange(200_000), 0)), rounded)
    assert stochastic_round_bf16(torch.tensor([float("nan")]), keys[:1]).isnan().all()


def test_bf16_second_moment_does_not_stagnate_where_round_to_nearest_would():
    """With g = 1 for 2000 steps fp32 Adam's v is 1 − 0.999^2000 ≈ 0.865; rounded to nearest bf16
    each step, v stops at 0.25, where 1e-3 (1 − v) is below half an ulp. Stochastic rounding follows
    fp32: the mean over 128 elements within 2% (the rounding errors, damped by β2, add up to ~3%
    per element, and are independent across elements)."""
    p = torch.nn.Parameter(torch.zeros(8, 16))
    opt = LazyAdam([p], lr=1e-6, moments="bf16")
    nearest = torch.zeros((), dtype=torch.bfloat16)
    for _ in range(2000):
        p.grad = torch.ones(8, 16)
        opt.step()
        nearest = (0.999 * nearest.float() + 1e-3).to(torch.bfloat16)
    exact = 1 - 0.999**2000
    assert nearest.item() < 0.5 * exact, "round to nearest stagnates"
    v = opt.state[p]["exp_avg_sq"].float()
    assert v.mean().item() == pytest.approx(exact, rel=0.02)
    assert (v - exact).abs().max().item() < 0.15 * exact


def test_bf16_moments_with_row_sparse_updates_change_only_the_touched_rows():
    rows = torch.tensor([2, 5, 11, 30])
    p16, state16 = _adam_run("bf16", 3, rows)
    p32, state32 = _adam_run("fp32", 3, rows)
    untouched = torch.ones(32, dtype=torch.bool).index_fill_(0, rows, False)
    start = torch.randn(32, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(p16[untouched], start[untouched])
    assert not torch.equal(p16[rows], start[rows])
    for slot in ("exp_avg", "exp_avg_sq"):  # 3 roundings, each within 2^-7 of a moment of about this size
        assert state16[slot].dtype == torch.bfloat16
        assert not state16[slot][untouched].any()
        torch.testing.assert_close(state16[slot][rows].float(), state32[slot][rows], rtol=0,
                                   atol=3 * 2**-7 * state32[slot][rows].abs().max().item())
    torch.testing.assert_close(p16, p32, rtol=0, atol=3 * 1e-2 * 2**-7)


def test_an_unknown_moments_setting_is_refused():
    with pytest.raises(ValueError, match="moments must be one of fp32, bf16"):
        LazyAdam([torch.nn.Parameter(torch.ones(2, 2))], moments="fp16")


def test_squared_norms_of_row_sparse_gradients_and_the_clip_scale_follow_torch():
    """``squared_norm`` of a row-sparse gradient (of some of its rows) is its dense form's, and
    ``clip_scale`` times the gradients is what ``clip_grad_norm_`` leaves."""
    torch.manual_seed(0)
    rows, values = torch.tensor([1, 4, 7]), torch.randn(3, 3)
    sparse, bias = torch.sparse_coo_tensor(rows[None], values, (10, 3), check_invariants=True), torch.randn(3)
    assert torch.allclose(squared_norm(sparse, slice(2, 8)), values[1:].square().sum())
    assert torch.allclose(squared_norm(sparse), squared_norm(sparse.to_dense()))
    reference = [torch.zeros(10, 3), torch.zeros(3)]
    for ref, grad in zip(reference, (sparse.to_dense(), bias)):
        ref.grad = grad.clone()
    torch.nn.utils.clip_grad_norm_(reference, 0.5)
    scale = clip_scale(0.5, (squared_norm(sparse) + squared_norm(bias)).sqrt())
    torch.testing.assert_close(scale * sparse.to_dense(), reference[0].grad)
    torch.testing.assert_close(scale * bias, reference[1].grad)
    assert clip_scale(1e9, torch.tensor(3.0)) == 1.0


@pytest.mark.parametrize("moments", ["fp32", "bf16"])
@pytest.mark.parametrize("unit_norm", [False, True])
def test_a_groups_grad_scale_is_a_step_on_the_scaled_gradient(moments, unit_norm):
    """``grad_scale = s_t`` on gradient ``g`` steps as ``s_t · g`` does (the compiled kernel scales
    inside its one pass, the torch path before Adam), dense and row-sparse. The scale changes from
    step to step, as a clipped norm's does: a constant one would leave Adam's steps nearly as they are."""
    torch.manual_seed(1)
    start, grad = torch.nn.functional.normalize(torch.randn(8, 5), dim=1), torch.randn(8, 5)
    scales = (1.0, 0.05, 0.5, 0.2)
    sparse = [None, None, torch.tensor([2, 5]), torch.tensor([0, 5, 7])]
    results = []
    for inside in (True, False):
        p = torch.nn.Parameter(start.clone())
        opt = LazyAdam([{"params": [p], "unit_norm_rows": unit_norm}], lr=1e-2, moments=moments)
        for scale, rows in zip(scales, sparse):
            g = grad if inside else scale * grad
            p.grad = g.clone() if rows is None else torch.sparse_coo_tensor(rows[None], g[rows], g.shape,
                                                                            check_invariants=True)
            opt.param_groups[0]["grad_scale"] = scale if inside else 1.0
            opt.step()
        results.append(p.detach().clone())
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)
