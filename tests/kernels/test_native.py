"""The compiled CPU kernels against plain-torch references, edge cases included."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
import torch

from switchsae.kernels import native
from switchsae.kernels.dispatch import grouped_select_topk
from switchsae.optim import LazyAdam

pytestmark = pytest.mark.skipif(not native.available(), reason="compiled kernels unavailable (no C compiler)")


def _same_top(values: torch.Tensor, indices: torch.Tensor, pre: torch.Tensor, k: int) -> None:
    """Same multiset of values as torch.topk, and every index points at its value."""
    want = pre.float().topk(k, dim=-1).values
    torch.testing.assert_close(values.sort(-1, descending=True).values, want, rtol=0, atol=0)
    assert torch.equal(pre.float().gather(1, indices), values)
    assert all(len(set(row.tolist())) == k for row in indices), "an index chosen twice"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,k", [(7, 3), (64, 5), (1000, 32), (1024, 32), (4096, 1), (50, 50), (100, 64)])
def test_topk_equals_torch_topk(dtype, m, k):
    pre = torch.randn(37, m, generator=torch.Generator().manual_seed(m + k)).to(dtype)
    values, indices = native.topk(pre, k)
    assert values.dtype == torch.float32 and indices.dtype == torch.int64
    _same_top(values, indices, pre, k)


RANK_MAX = 256  # native.c: select_largest ranks by counting up to this many entries, else quickselects


def _n_blocks(m: int, k: int) -> int:
    """native.c's block count for a row of ``m`` (block_width), i.e. the first select_largest's size."""
    width = m // (2 * k)
    width = width // 16 * 16 if width >= 16 else max(width, 1)
    return -(-m // width)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,k,ties", [(4096, 300, False), (4096, 300, True), (2000, 260, False), (1000, 999, True)])
def test_topk_through_quickselect_equals_torch_topk(dtype, m, k, ties):
    """k >= 256: more than RANK_MAX block maxima and candidates, so select_largest quickselects
    (with ties, through its three-way partition's equal run)."""
    assert _n_blocks(m, k) > RANK_MAX or k > RANK_MAX
    gen = torch.Generator().manual_seed(m + k)
    pre = torch.randint(0, 40, (9, m), generator=gen).float() if ties else torch.randn(9, m, generator=gen)
    values, indices = native.topk(pre.to(dtype), k)
    _same_top(values, indices, pre.to(dtype), k)


def test_topk_with_ties_and_constant_rows():
    gen = torch.Generator().manual_seed(0)
    pre = torch.cat([torch.randint(0, 4, (20, 300), generator=gen).float(), torch.zeros(3, 300)])
    values, indices = native.topk(pre, 16)
    _same_top(values, indices, pre, 16)


def test_topk_shifts_each_rows_indices_by_its_offset():
    pre = torch.randn(6, 40)
    offsets = torch.tensor([0, 0, 40, 40, 80, 80])
    values, indices = native.topk(pre, 4, offsets)
    _same_top(values, indices - offsets[:, None], pre, 4)


def test_topk_of_a_row_with_nans_stays_in_range():
    pre = torch.randn(4, 100)
    pre[1] = float("nan")
    pre[2, ::3] = float("nan")
    _, indices = native.topk(pre, 10)
    assert bool(((indices >= 0) & (indices < 100)).all())
    assert all(len(set(row.tolist())) == 10 for row in indices), "an index chosen twice"
    _same_top(*native.topk(pre[[0, 3]], 10), pre[[0, 3]], 10)


def test_topk_rejects_k_larger_than_the_row():
    with pytest.raises(ValueError, match="k = 9"):
        native.topk(torch.randn(2, 8), 9)


def test_grouped_select_handles_uneven_and_empty_experts():
    gen = torch.Generator().manual_seed(0)
    x, W = torch.randn(300, 24, generator=gen), torch.randn(5 * 32, 24, generator=gen)
    counts = [0, 280, 1, 0, 19]
    values, indices = native.grouped_select(x, W, counts, 6)
    expert = torch.repeat_interleave(torch.arange(5), torch.tensor(counts))
    mask = torch.arange(160) // 32 != expert[:, None]
    ref = (x @ W.t()).masked_fill(mask, float("-inf")).topk(6, dim=-1)
    assert torch.equal(indices.sort(-1).values, ref.indices.sort(-1).values)
    torch.testing.assert_close(values.sort(-1).values, ref.values.sort(-1).values)


def test_gather_dot_and_transposed_product_equal_dense_references():
    gen = torch.Generator().manual_seed(0)
    x, W = torch.randn(30, 12, generator=gen), torch.randn(50, 12, generator=gen)
    indices = torch.randint(0, 50, (30, 4), generator=gen)
    indices[:, 3] = indices[:, 0]  # a latent named twice in a row adds up
    weights = torch.randn(30, 4, generator=gen)
    torch.testing.assert_close(native.gather_dot(x, W, indices), (W[indices] * x[:, None]).sum(-1))
    dense = torch.zeros(30, 50).index_put_((torch.arange(30)[:, None].expand(-1, 4), indices), weights, accumulate=True)
    product, no_sum = native.transposed_product(weights, indices, x, 50)
    torch.testing.assert_close(product, dense.t() @ x)
    assert no_sum is None
    # with W: the weights' row sums against W's rows, directly or through compact row ids
    torch.testing.assert_close(native.transposed_product(weights, indices, x, 50, W)[1], dense.sum(0) @ W)
    row_ids = torch.randperm(80, generator=gen)[:50]
    W_big = torch.randn(80, 12, generator=gen)
    torch.testing.assert_close(native.transposed_product(weights, indices, x, 50, W_big, row_ids)[1],
                               dense.sum(0) @ W_big[row_ids])


def test_out_of_range_indices_are_an_error_not_a_crash():
    x, W = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(IndexError, match=r"\[0, 5\)"):
        native.gather_dot(x, W, torch.tensor([[0, 5]] * 3))
    with pytest.raises(IndexError):
        native.transposed_product(torch.ones(3, 1), torch.tensor([[-1]] * 3), x, 5)


def test_adam_rows_equals_torch_adam_on_those_rows():
    gen = torch.Generator().manual_seed(0)
    param = torch.randn(10, 6, generator=gen)
    ref = torch.nn.Parameter(param[[1, 4, 7]].clone())
    opt = torch.optim.Adam([ref], lr=0.01, fused=True)
    exp_avg, exp_avg_sq = torch.zeros_like(param), torch.zeros_like(param)
    rows = torch.tensor([1, 4, 7])
    untouched = param[[0, 2, 3, 5, 6, 8, 9]].clone()
    for step in range(1, 4):
        grad = torch.randn(3, 6, generator=gen)
        ref.grad = grad.clone()
        opt.step()
        native.adam_rows(param, exp_avg, exp_avg_sq, grad, rows, lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, step=step)
    torch.testing.assert_close(param[rows], ref.detach())
    torch.testing.assert_close(exp_avg[rows], opt.state[ref]["exp_avg"])
    assert torch.equal(param[[0, 2, 3, 5, 6, 8, 9]], untouched)


def test_adam_rows_rewrites_the_bf16_copy_of_the_rows_it_updates_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    param = torch.randn(10, 37, generator=gen) * 3
    param[2, :3] = torch.tensor([float("nan"), 1 + 2**-8, -(1 + 3 * 2**-8)])  # NaN and rounding ties
    low = param.to(torch.bfloat16)
    stale = low[[0, 5]].clone()
    rows = torch.tensor([1, 2, 7])
    native.adam_rows(param, torch.zeros_like(param), torch.zeros_like(param), torch.randn(3, 37, generator=gen), rows,
                     lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, step=1, low=low)
    want, got = param[rows].to(torch.bfloat16), low[rows]
    assert torch.equal(got.isnan(), want.isnan())  # torch's own NaN bits differ between its code paths
    assert torch.equal(got[~got.isnan()].view(torch.int16), want[~want.isnan()].view(torch.int16))
    assert torch.equal(low[[0, 5]], stale), "rows not updated are not touched"


@contextlib.contextmanager
def _built_with(compiler: Path | str, monkeypatch, cache: Path | str):
    """A fresh load of the kernels with ``compiler`` (``$CC``) into an empty ``cache``
    (``$SWITCHSAE_CACHE``); the real build is loaded again afterwards."""
    monkeypatch.setenv("CC", str(compiler))
    monkeypatch.setenv("SWITCHSAE_CACHE", str(cache))
    native._library.cache_clear()
    try:
        yield
    finally:
        monkeypatch.undo()
        native._library.cache_clear()


def test_a_missing_compiler_falls_back_with_a_warning(monkeypatch, tmp_path):
    with _built_with(tmp_path / "no-such-compiler", monkeypatch, tmp_path):
        with pytest.warns(UserWarning, match="using torch ops"):
            assert not native.available()
    assert native.available()


def test_a_build_survives_a_broken_home_an_empty_cache_variable_a_cc_with_arguments_and_no_cpuinfo(
        monkeypatch, tmp_path):
    """A real compile with ``CC="env cc -w"`` (a wrapper and a flag, as ``ccache gcc`` or
    ``gcc -m64``), ``$SWITCHSAE_CACHE`` empty, ``$HOME`` a file and /proc/cpuinfo unreadable: the
    kernels build in the private temp folder, keyed by the compiler's view of the CPU."""
    from switchsae import host

    (tmp_path / "home").write_text("a file, not a folder")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(host, "CPUINFO", tmp_path / "no-cpuinfo")
    host._cache_root.cache_clear()
    with _built_with(f"env {shutil.which('cc')} -w", monkeypatch, ""):
        with pytest.warns(UserWarning, match="cache folder") as caught:
            assert native.available()
        assert not [w for w in caught if "unavailable" in str(w.message)]
        built = list((tmp_path / f"switchsae-{os.getuid()}" / "native").glob("native-*.so"))
        assert len(built) == 1
        pre = torch.randn(5, 300)
        _same_top(*native.topk(pre, 7), pre, 7)
        assert "#define __" in native._cpu_features(native._compiler())
    host._cache_root.cache_clear()


def test_a_hung_compiler_is_killed_with_its_children_and_the_torch_path_used(monkeypatch, tmp_path):
    compiler = tmp_path / "hung-cc"
    child = tmp_path / "child.pid"
    compiler.write_text(f"#!/bin/sh\ncase \"$*\" in *--version*|*-dM*) echo hung 1.0; exit 0;; esac\n"
                        f"sleep 60 &\necho $! > {child}\nwait\n")
    compiler.chmod(0o755)
    monkeypatch.setenv("SWITCHSAE_COMPILE_TIMEOUT", "0.5")
    started = time.monotonic()
    with _built_with(compiler, monkeypatch, tmp_path / "cache"):
        with pytest.warns(UserWarning, match=r"did not finish within 0.5 s.*using torch ops"):
            assert not native.available()
    assert time.monotonic() - started < 20
    assert not _running(int(child.read_text())), "the compiler's own child is killed too"


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (which a container's init may never reap)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("rows", [None, [1, 4, 7]], ids=["all rows", "named rows"])
def test_unit_norm_adam_rows_equals_projection_then_adam_then_renormalisation(rows):
    gen = torch.Generator().manual_seed(0)
    param = torch.nn.functional.normalize(torch.randn(10, 6, generator=gen), dim=1)
    updated = list(range(10)) if rows is None else rows
    others = [r for r in range(10) if r not in updated]
    ref = torch.nn.Parameter(param[updated].clone())
    opt = torch.optim.Adam([ref], lr=0.05, fused=True)
    exp_avg, exp_avg_sq = torch.zeros_like(param), torch.zeros_like(param)
    untouched = param[others].clone()
    for step in range(1, 4):
        grad = torch.randn(len(updated), 6, generator=gen)
        with torch.no_grad():
            ref.grad = grad - (grad * ref).sum(1, keepdim=True) * ref
        opt.step()
        with torch.no_grad():
            ref.div_(ref.norm(dim=1, keepdim=True))
        native.adam_rows(param, exp_avg, exp_avg_sq, grad, None if rows is None else torch.tensor(rows), lr=0.05,
                         beta1=0.9, beta2=0.999, eps=1e-8, step=step, unit_norm=True)
    torch.testing.assert_close(param[updated], ref.detach())
    torch.testing.assert_close(param.norm(dim=1), torch.ones(10))
    torch.testing.assert_close(exp_avg_sq[updated], opt.state[ref]["exp_avg_sq"])
    assert torch.equal(param[others], untouched)


def test_grouped_select_rejects_counts_that_do_not_cover_the_tokens():
    x, W = torch.randn(10, 4), torch.randn(4 * 8, 4)
    with pytest.raises(ValueError, match="4 experts with 9 tokens"):
        native.grouped_select(x, W, [3, 3, 3, 0], 2)


def test_in_place_kernels_bump_version_counters_like_torch_in_place_ops():
    state = w, m, v = torch.randn(4, 3), torch.zeros(4, 3), torch.zeros(4, 3)
    versions = [t._version for t in state]
    native.adam_rows(w, m, v, torch.randn(4, 3), lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, step=1)
    assert [t._version for t in state] == [version + 1 for version in versions]


def test_a_failing_compile_is_reported_with_the_compilers_message(monkeypatch, tmp_path):
    compiler = tmp_path / "broken-cc"
    compiler.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo broken 1.0; exit 0; fi\n"
                        "echo 'omp.h: No such file' >&2; exit 1\n")
    compiler.chmod(0o755)
    with _built_with(compiler, monkeypatch, tmp_path):
        with pytest.warns(UserWarning, match="omp.h: No such file"):
            assert not native.available()


def test_bf16_selection_takes_the_compiled_top_k(monkeypatch):
    calls = []
    topk = native.topk
    monkeypatch.setattr(native, "topk", lambda pre, *args: calls.append(pre.dtype) or topk(pre, *args))
    gen = torch.Generator().manual_seed(0)
    x, W = torch.randn(40, 16, generator=gen), torch.randn(4 * 16, 16, generator=gen)
    grouped_select_topk(x, W, [10, 10, 20, 0], 3, W.to(torch.bfloat16))
    assert calls == [torch.bfloat16]


def test_mismatched_shapes_are_an_error_before_any_c_code_runs():
    x, W = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match="gather_dot needs"):
        native.gather_dot(x, W, torch.zeros(2, 1, dtype=torch.int64))
    with pytest.raises(ValueError, match="transposed_product needs"):
        native.transposed_product(torch.ones(3, 2), torch.zeros(3, 1, dtype=torch.int64), x, 5)
    with pytest.raises(ValueError, match="one offset per row"):
        native.topk(torch.randn(3, 8), 2, torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="adam_rows needs"):
        native.adam_rows(W, torch.zeros_like(W), torch.zeros_like(W), torch.randn(1, 4), torch.tensor([0, 1]),
                         lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, step=1)


def test_outputs_are_float32_whatever_the_default_dtype():
    """The kernels write fp32; their output buffers must be fp32 even under set_default_dtype(float64)."""
    gen = torch.Generator().manual_seed(0)
    x, W = torch.randn(6, 8, generator=gen), torch.randn(10, 8, generator=gen)
    indices = torch.randint(0, 10, (6, 3), generator=gen)
    weights, b = torch.randn(6, 3, generator=gen), torch.randn(8, generator=gen)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        dots = native.gather_dot(x, W, indices)
        product, _ = native.transposed_product(weights, indices, x, 10)
        values, _ = native.topk(x, 2)
        x_hat, residual, _, _, _ = native.decode_residual(weights, indices, W, b, x, value_grads=True)
    finally:
        torch.set_default_dtype(before)
    torch.testing.assert_close(dots, (W[indices] * x[:, None]).sum(-1))
    dense = torch.zeros(6, 10).index_put_((torch.arange(6)[:, None].expand(-1, 3), indices), weights, accumulate=True)
    torch.testing.assert_close(product, dense.t() @ x)
    torch.testing.assert_close(values.sort(-1).values, x.topk(2).values.sort(-1).values)
    torch.testing.assert_close(residual, x_hat - x)


@pytest.mark.parametrize("rows", [None, [1, 4, 7, 30]], ids=["all rows", "named rows"])
def test_bf16_moment_adam_gives_the_torch_paths_bits(rows, monkeypatch):
    """The compiled kernel and the plain-torch path (SWITCHSAE_NATIVE=0) round the same fp32 values
    with the same noise: parameters and both moments equal bit for bit after 20 steps."""
    def run():
        gen = torch.Generator().manual_seed(0)
        p = torch.nn.Parameter(torch.randn(40, 37, generator=gen))
        opt = LazyAdam([p], lr=0.01, moments="bf16")
        for _ in range(20):
            g = torch.randn(40, 37, generator=gen) * 10 ** torch.randn(40, 1, generator=gen)
            p.grad = g if rows is None else torch.sparse_coo_tensor(torch.tensor([rows]), g[rows], (40, 37),
                                                                     check_invariants=True)
            opt.step()
        return [t.detach().view(torch.int16 if t.dtype == torch.bfloat16 else torch.int32)
                for t in (p, opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"])]

    compiled = run()
    monkeypatch.setenv("SWITCHSAE_NATIVE", "0")
    for name, got, want in zip(("param", "exp_avg", "exp_avg_sq"), run(), compiled):
        assert torch.equal(got, want), name


def test_the_fused_selections_tile_size_changes_no_bit_of_its_result(monkeypatch):
    """The tile is a speed setting: runs trained with another tile size give the same selection."""
    gen = torch.Generator().manual_seed(0)
    x, W = torch.randn(700, 40, generator=gen), torch.randn(3 * 96, 40, generator=gen)
    counts = [600, 0, 100]
    results = []
    for tile in (64, native.SELECTION_TILE):
        monkeypatch.setattr(native, "SELECTION_TILE", tile)
        values, indices = native.grouped_select(x, W, counts, 5)
        order = indices.argsort(-1)
        results.append((values.gather(1, order), indices.gather(1, order)))
    assert all(torch.equal(a, b) for a, b in zip(*results))
