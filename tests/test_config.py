"""Every config field is read by the code it configures (no flag outlives its code, SPEC §8)."""
from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest

from switchsae.config import RoutingConfig, SAEConfig, TrainConfig

PACKAGE = Path(__file__).resolve().parents[1] / "switchsae"
SOURCES = {path: path.read_text() for path in PACKAGE.rglob("*.py") if path.name != "config.py"}


@pytest.mark.parametrize("field", [f.name for cls in (SAEConfig, RoutingConfig, TrainConfig) for f in fields(cls)])
def test_every_field_is_read_outside_config(field):
    pattern = re.compile(rf"\.{field}\b")
    assert any(pattern.search(text) for text in SOURCES.values()), f"{field} is never read"


def test_every_field_has_help_text():
    for cls in (SAEConfig, RoutingConfig, TrainConfig):
        for f in fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"
