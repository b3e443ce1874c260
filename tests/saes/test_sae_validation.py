"""Bad configs and bad inputs fail early with a ValueError that names the problem."""
from __future__ import annotations

import pytest
import torch

from switchsae.config import SAEConfig
from switchsae.saes import REGISTRY


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"arch": "topk", "width": 8, "k": 16}, "exceeds the width"),
        ({"arch": "batchtopk", "width": 8, "k": 16}, "exceeds the width"),
        ({"arch": "switch", "width": 63, "n_experts": 4}, "not divisible"),
        ({"arch": "switch", "width": 64, "n_experts": 16, "k": 8}, "width of one expert"),
        ({"arch": "topk", "n_experts": 4}, "only to the switch"),
        ({"arch": "mystery"}, "Unknown architecture"),
        ({"arch": "relu", "width": 0}, "positive integer"),
        ({"arch": "relu", "l1_coeff": -1.0}, "non-negative"),
    ],
)
def test_config_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        SAEConfig(**{"d_model": 16, "width": 64, **changes})


@pytest.mark.parametrize("arch", sorted(REGISTRY))
@pytest.mark.parametrize(
    "bad",
    [torch.randn(8, 15), torch.randn(16), torch.randn(2, 8, 16), torch.ones(8, 16, dtype=torch.long)],
    ids=["wrong-width", "1d", "3d", "integer"],
)
def test_wrong_input_shape_or_dtype(arch, bad, make_sae):
    sae = make_sae(arch)
    for call in (sae, sae.encode):
        with pytest.raises(ValueError, match="expected"):
            call(bad)
