"""Every config field is read by the code it configures (no flag outlives its code, SPEC §8)."""
from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest

from switchsae.config import ParallelConfig, RoutingConfig, SAEConfig, TrainConfig

PACKAGE = Path(__file__).resolve().parents[1] / "switchsae"
SOURCES = {path: path.read_text() for path in PACKAGE.rglob("*.py") if path.name != "config.py"}


@pytest.mark.parametrize("field", [f.name for cls in (SAEConfig, RoutingConfig, TrainConfig, ParallelConfig)
                                   for f in fields(cls)])
def test_every_field_is_read_outside_config(field):
    pattern = re.compile(rf"\.{field}\b")
    assert any(pattern.search(text) for text in SOURCES.values()), f"{field} is never read"


def test_every_field_has_help_text():
    for cls in (SAEConfig, RoutingConfig, TrainConfig, ParallelConfig):
        for f in fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"


@pytest.mark.parametrize("changes, words", [
    ({"beta1": 1.0}, "beta1 must lie in [0, 1), got 1.0"),
    ({"beta2": -0.1}, "beta2 must lie in [0, 1)"),
    ({"eps": 0.0}, "eps must be a positive finite number"),
    ({"eps": float("inf")}, "eps must be a positive finite number"),
    ({"lr": float("nan")}, "lr must be a positive finite number"),
    ({"batch_size": 0}, "batch_size must be a positive integer, got 0"),
    ({"steps": -3}, "steps must be a positive integer"),
    ({"log_every": 0}, "log_every must be a positive integer"),
    ({"checkpoint_every": -1}, "checkpoint_every must be 0"),
    ({"seed": -1}, "seed must be an integer in [0, 2**63)"),
    ({"seed": 2**63}, "seed must be an integer in [0, 2**63)"),
    ({"device": "cuda:x"}, "device must be cpu, cuda or cuda:N"),
])
def test_train_config_refuses_bad_values_with_a_sentence(changes, words):
    with pytest.raises(ValueError) as info:
        TrainConfig(**changes)
    assert words in str(info.value) and str(info.value).endswith(".")


def test_the_largest_seed_trains(acts):
    from switchsae.config import SAEConfig
    from switchsae.train import train

    sae_cfg = SAEConfig(arch="topk", d_model=16, width=32, k=4)
    train(sae_cfg, acts, TrainConfig(steps=2, batch_size=64, seed=2**63 - 1), progress=False)
