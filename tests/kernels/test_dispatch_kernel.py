"""Grouped expert selection equals a masked dense reference and never touches other experts."""
from __future__ import annotations

import pytest
import torch

from switchsae.kernels import dispatch
from switchsae.kernels.dispatch import grouped_select_topk

pytestmark = pytest.mark.usefixtures("kernel_backend")

T, D, N_EXPERTS, EXPERT_WIDTH, K = 40, 16, 4, 16, 3


def _inputs(tokens: int = T) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, D, generator=gen)
    W = torch.randn(N_EXPERTS * EXPERT_WIDTH, D, generator=gen)
    expert = torch.randint(0, N_EXPERTS - 1, (tokens,), generator=gen)  # the last expert gets no token
    return x, W, expert


def sort_by_expert(expert: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, list[int]]:
    """The permutation grouping tokens by expert and each expert's count (as a top-1 Assignment holds them)."""
    return torch.argsort(expert, stable=True), torch.bincount(expert, minlength=n_experts).tolist()


def _sorted_by_index(values: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    indices, order = indices.sort(-1)
    return values.gather(1, order), indices


@pytest.mark.parametrize("tokens", [T, 1000], ids=["one-tile-per-expert", "several-tiles-per-expert"])
def test_grouped_select_equals_all_experts_masked_to_minus_infinity(tokens):
    x, W, expert = _inputs(tokens)
    order, counts = sort_by_expert(expert, N_EXPERTS)
    x, expert = x[order], expert[order]
    assert bool((expert[1:] >= expert[:-1]).all())
    values, indices = grouped_select_topk(x, W, counts, K)

    pre = x @ W.t()
    other_expert = torch.arange(W.shape[0]) // EXPERT_WIDTH != expert[:, None]
    ref = pre.masked_fill(other_expert, float("-inf")).topk(K, dim=-1)

    got_values, got_indices = _sorted_by_index(values, indices)
    want_values, want_indices = _sorted_by_index(ref.values, ref.indices)
    assert torch.equal(got_indices, want_indices)
    torch.testing.assert_close(got_values, want_values)


def test_bf16_grouped_selection_returns_exact_fp32_values():
    x, W, expert = _inputs()
    order, counts = sort_by_expert(expert, N_EXPERTS)
    values, indices = grouped_select_topk(x[order], W, counts, K, W.to(torch.bfloat16))
    assert bool(((indices // EXPERT_WIDTH) == expert[order][:, None]).all())
    torch.testing.assert_close(values, (W[indices] * x[order][:, None, :]).sum(-1))


def test_pre_activation_memory_per_token_is_one_experts_width(monkeypatch):
    """The unfused path's one buffer is ``[T, M/N]``: each token's row holds only its expert's latents."""
    monkeypatch.setenv("SWITCHSAE_NATIVE", "0")
    x, W, expert = _inputs()
    shapes = []
    largest_entries = dispatch.largest_entries

    def recording(pre, *args):
        shapes.append(tuple(pre.shape))
        return largest_entries(pre, *args)

    monkeypatch.setattr(dispatch, "largest_entries", recording)
    order, counts = sort_by_expert(expert, N_EXPERTS)
    grouped_select_topk(x[order], W, counts, K)
    assert shapes == [(T, EXPERT_WIDTH)]


def test_the_grouped_matmul_path_equals_one_matmul_per_expert(monkeypatch):
    """The CUDA path's logic (``torch._grouped_mm`` over experts, an empty one included), run on CPU."""
    x, W, expert = _inputs()
    order, counts = sort_by_expert(expert, N_EXPERTS)
    assert counts[-1] == 0
    assert not dispatch.grouped_mm_available(torch.device("cpu"), torch.bfloat16)
    per_expert = dispatch.expert_products(x[order], W, counts, torch.bfloat16)
    monkeypatch.setattr(dispatch, "grouped_mm_available", lambda device, dtype: True)
    grouped = dispatch.expert_products(x[order], W, counts, torch.bfloat16)
    assert grouped.shape == (T, EXPERT_WIDTH) and grouped.dtype == torch.bfloat16
    torch.testing.assert_close(grouped, per_expert)

