"""Duplication across experts, router alignment and Pareto fronts on cases with known answers."""
from __future__ import annotations

import pytest
import torch

from switchsae.analysis import geometry
from switchsae.analysis.geometry import expert_duplication, pareto_front, router_alignment


def test_identical_experts_are_fully_duplicated():
    expert = torch.randn(8, 16)
    result = expert_duplication(torch.cat([expert, 3 * expert]), n_experts=2)
    assert result["max_cos"] == pytest.approx(torch.ones(16), abs=1e-5)
    assert result["mean_max_cos"] == pytest.approx(1.0, abs=1e-5)
    assert result["frac_above"] == 1.0


def test_orthogonal_experts_share_nothing_even_when_rows_repeat_within_an_expert():
    eye = torch.eye(8)
    w_dec = torch.cat([eye[:4], eye[:4], eye[4:], eye[4:]])  # each expert repeats its own rows twice
    result = expert_duplication(w_dec, n_experts=2)
    assert result["max_cos"] == pytest.approx(torch.zeros(16), abs=1e-6)
    assert result["frac_above"] == 0.0


def test_blockwise_duplication_matches_the_full_similarity_matrix(monkeypatch):
    w_dec = torch.randn(48, 8, generator=torch.Generator().manual_seed(0))
    unit = torch.nn.functional.normalize(w_dec, dim=1)
    sims = unit @ unit.t()
    expert_of = torch.arange(48) // 12
    expected = sims.masked_fill(expert_of[:, None] == expert_of[None, :], -2).amax(1)
    monkeypatch.setattr(geometry, "BLOCK_ELEMENTS", 5 * 48)  # blocks of 5 rows cut across experts
    result = expert_duplication(w_dec, n_experts=4, threshold=0.5)
    assert torch.allclose(result["max_cos"], expected, atol=1e-6)
    assert result["frac_above"] == pytest.approx((expected > 0.5).float().mean().item())


def test_duplication_needs_two_experts_that_divide_the_rows():
    with pytest.raises(ValueError, match="at least two experts"):
        expert_duplication(torch.randn(8, 4), n_experts=1)
    with pytest.raises(ValueError, match="cannot be split evenly into 3 experts"):
        expert_duplication(torch.randn(8, 4), n_experts=3)


def test_router_alignment_is_cosine_with_each_experts_mean_decoder_direction():
    w_dec = torch.cat([torch.eye(4)[:2], torch.eye(4)[2:]])  # expert 0: e0, e1; expert 1: e2, e3
    w_router = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, -1.0]])
    align = router_alignment(w_router, w_dec, n_experts=2)
    assert align == pytest.approx(torch.tensor([1.0, -2**-0.5]), abs=1e-6)
    with pytest.raises(ValueError, match="does not match 4 experts"):
        router_alignment(w_router, w_dec, n_experts=4)


@pytest.mark.parametrize("points, front", [
    ([(1, 5), (2, 3), (3, 4), (4, 1)], [0, 1, 3]),
    ([(3, 1), (1, 3), (2, 2)], [1, 2, 0]),
    ([(1, 2), (1, 1), (2, 1)], [1]),
    ([(1, 1), (1, 1)], [0]),
    ([], []),
])
def test_pareto_front_keeps_points_no_other_point_beats_in_both(points, front):
    assert pareto_front(points) == front
