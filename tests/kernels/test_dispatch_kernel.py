"""Grouped expert selection equals a masked dense reference and never touches other experts."""
from __future__ import annotations

import torch

from switchsae.kernels import dispatch
from switchsae.kernels.dispatch import grouped_select_topk, sort_by_expert

T, D, N_EXPERTS, EXPERT_WIDTH, K = 40, 16, 4, 16, 3


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(T, D, generator=gen)
    W = torch.randn(N_EXPERTS * EXPERT_WIDTH, D, generator=gen)
    expert = torch.randint(0, N_EXPERTS - 1, (T,), generator=gen)  # the last expert gets no token
    return x, W, expert


def _sorted_by_index(values: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    indices, order = indices.sort(-1)
    return values.gather(1, order), indices


def test_grouped_select_equals_all_experts_masked_to_minus_infinity():
    x, W, expert = _inputs()
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


def test_selection_runs_per_expert_on_its_own_tokens_only(monkeypatch):
    """Pre-activation memory per token is ``M/N``: each call sees one expert's rows and tokens."""
    x, W, expert = _inputs()
    calls = []
    select = dispatch.select_topk

    def recording_select(x_e, W_e, *args):
        calls.append((x_e.shape[0], W_e.shape[0]))
        return select(x_e, W_e, *args)

    monkeypatch.setattr(dispatch, "select_topk", recording_select)
    order, counts = sort_by_expert(expert, N_EXPERTS)
    grouped_select_topk(x[order], W, counts, K)

    assert calls == [(count, EXPERT_WIDTH) for count in counts if count > 0]
