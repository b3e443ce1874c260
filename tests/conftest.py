"""Shared fixtures: tiny synthetic activations and configs."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)


@pytest.fixture
def acts() -> torch.Tensor:
    """2,000 synthetic activations of width 16 with a known sparse structure."""
    from switchsae.sources.synthetic import synthetic_activations

    return synthetic_activations(2000, 16, n_features=64, active=3, seed=0)


@pytest.fixture(params=["native", "torch"])
def kernel_backend(request, monkeypatch) -> str:
    """Run a test with the compiled CPU kernels and again with the plain-torch paths."""
    from switchsae.kernels import native

    if request.param == "torch":
        monkeypatch.setenv("SWITCHSAE_NATIVE", "0")
    elif not native.available():
        pytest.skip("compiled kernels unavailable here (no C compiler)")
    return request.param


@pytest.fixture
def locked_by_another_process():
    """``with locked_by_another_process(run_dir):`` a real second process holds the run's lock."""
    return _locked_by_another_process


@contextlib.contextmanager
def _locked_by_another_process(run_dir: Path) -> Iterator[None]:
    """A bare interpreter (no torch) holds ``run_dir``'s run lock while the block runs."""
    from switchsae.run_folder import LOCK_FILE

    run_dir.mkdir(parents=True, exist_ok=True)
    holder = ("import fcntl, sys\nf = open(sys.argv[1], 'w')\nfcntl.flock(f, fcntl.LOCK_EX)\n"
              "print('locked', flush=True)\nsys.stdin.read()\n")
    with subprocess.Popen([sys.executable, "-c", holder, str(run_dir / LOCK_FILE)], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True) as process:
        assert process.stdout.readline() == "locked\n"
        try:
            yield
        finally:
            process.stdin.close()  # the holder exits, and the kernel releases its lock
