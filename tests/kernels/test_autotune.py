"""``--matmul-dtype auto``: measured once per machine, cached, the faster dtype picked."""
from __future__ import annotations

import json

import pytest
import torch

from switchsae.kernels import autotune


@pytest.fixture
def empty_cache(monkeypatch, tmp_path):
    """A fresh cache folder and no decision remembered by this process."""
    monkeypatch.setenv("SWITCHSAE_CACHE", str(tmp_path))
    autotune._cpu_decision.cache_clear()
    yield tmp_path / "autotune"
    autotune._cpu_decision.cache_clear()


def test_a_real_measurement_picks_one_dtype_and_is_cached(monkeypatch, empty_cache):
    monkeypatch.setattr(autotune, "SHAPE", (256, 64, 256))  # a small real measurement
    monkeypatch.setattr(autotune, "REPEATS", 2)
    dtype, reason = autotune.resolve_matmul_dtype("auto", "cpu")
    assert dtype in ("float32", "bfloat16") and "GFLOP/s" in reason
    [path] = empty_cache.glob("matmul-*.json")
    saved = json.loads(path.read_text())
    assert saved["choice"] == dtype and set(saved["gflops"]) == {"float32", "bfloat16"}
    assert saved["torch"] == torch.__version__ and saved["shape"] == [256, 64, 256]


def _faster(monkeypatch, dtype: str) -> None:
    """Timings in which ``dtype`` runs the matmul in a third of the other's time."""
    monkeypatch.setattr(autotune, "matmul_seconds", lambda d, shape, repeats: 1.0 if d == getattr(torch, dtype) else 3.0)


@pytest.mark.parametrize("faster", ["float32", "bfloat16"])
def test_the_faster_dtype_wins(monkeypatch, empty_cache, faster):
    _faster(monkeypatch, faster)
    assert autotune.resolve_matmul_dtype("auto", "cpu")[0] == faster


def test_a_cached_decision_is_read_not_measured_again_and_a_corrupt_one_is_replaced(monkeypatch, empty_cache):
    _faster(monkeypatch, "float32")
    assert autotune.resolve_matmul_dtype("auto", "cpu")[0] == "float32"
    autotune._cpu_decision.cache_clear()  # as a new process would start

    def no_measuring(*args):
        raise AssertionError("measured again")
    monkeypatch.setattr(autotune, "matmul_seconds", no_measuring)
    assert autotune.resolve_matmul_dtype("auto", "cpu")[0] == "float32"
    [path] = empty_cache.glob("matmul-*.json")
    path.write_text("{not json")
    autotune._cpu_decision.cache_clear()
    _faster(monkeypatch, "bfloat16")
    assert autotune.resolve_matmul_dtype("auto", "cpu")[0] == "bfloat16"
    assert json.loads(path.read_text())["choice"] == "bfloat16"


def test_explicit_dtypes_are_kept_and_cuda_follows_the_device(monkeypatch):
    assert autotune.resolve_matmul_dtype("float32", "cpu") == ("float32", "as requested")
    for supported, dtype in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda supported=supported: supported)
        assert autotune.resolve_matmul_dtype("auto", "cuda:0")[0] == dtype
