"""``--matmul-dtype auto``: the dtype of the TopK family's selection matmul, chosen per machine.

A bf16 selection is not always faster: it was slower than fp32 on an Intel host without AMX and
faster on an AMD host with AVX-512 bf16 (README, "Training flags"). So nothing is hard-wired:

- CUDA: bf16 where the device supports it (``torch.cuda.is_bf16_supported()``), else fp32.
- CPU: measured once per machine. Each dtype times one ``SHAPE`` matmul (``[4096, 576] x
  [576, 4096]``: a training batch of d = 576 against 4,096 latents, the weight read transposed as
  the selection reads it), one warm-up then the best of ``REPEATS``; the faster dtype wins. The
  decision is cached as JSON in ``<cache>/autotune/`` (:func:`switchsae.host.cache_dir`), keyed by
  the CPU's model and flags, the machine type and the torch version, written atomically, and read
  by every later process on the machine; delete the file to measure again.

Only what is picked changes with the dtype: the selected latents' values, the gradients and the
optimizer stay fp32 either way (see :meth:`switchsae.saes.base.SparseAutoencoder.selection_weights`).
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import platform
import time
from pathlib import Path

import torch

from switchsae import host

SHAPE = (4096, 576, 4096)  # tokens T, model width d, latents M
REPEATS = 3
CHOICES = ("float32", "bfloat16")


def resolve_matmul_dtype(requested: str, device: str) -> tuple[str, str]:
    """``(dtype, reason)``: ``requested`` itself unless it is ``"auto"``, else this machine's choice."""
    if requested != "auto":
        return requested, "as requested"
    if device.startswith("cuda"):
        supported = torch.cuda.is_bf16_supported()
        return ("bfloat16" if supported else "float32"), f"the CUDA device {'supports' if supported else 'lacks'} bf16"
    path = host.cache_dir("autotune") / f"matmul-{_machine_key()}.json"
    decision = _cpu_decision(path)
    rates = ", ".join(f"{dtype} {rate:.0f}" for dtype, rate in decision["gflops"].items())
    return decision["choice"], f"measured on this CPU: {rates} GFLOP/s; cached in {path}"


@functools.cache
def _cpu_decision(path: Path) -> dict:
    """The decision stored at ``path``, or a fresh measurement stored there (once per process)."""
    try:
        decision = json.loads(path.read_text())
        if decision.get("choice") in CHOICES and isinstance(decision.get("gflops"), dict):
            return decision
    except (OSError, ValueError):
        pass
    decision = measure(SHAPE, REPEATS)
    host.write_text_atomic(path, json.dumps(decision, indent=2) + "\n")
    return decision


def measure(shape: tuple[int, int, int], repeats: int) -> dict:
    """Time both dtypes at ``shape``; ``{"choice", "gflops": {dtype: rate}, ...}`` with what was measured."""
    rates = {dtype: 2 * math.prod(shape) / matmul_seconds(getattr(torch, dtype), shape, repeats) / 1e9
             for dtype in CHOICES}
    return {"choice": max(rates, key=rates.__getitem__), "gflops": rates, "shape": list(shape), "repeats": repeats,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "cpu": host.cpu_identity()[0]}


def matmul_seconds(dtype: torch.dtype, shape: tuple[int, int, int], repeats: int) -> float:
    """The fastest of ``repeats`` runs (after one warm-up) of ``x @ Wᵀ``, ``x: [T, d]``, ``W: [M, d]``."""
    n_tokens, d, n_latents = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n_tokens, d, generator=gen).to(dtype)
    W = torch.randn(n_latents, d, generator=gen).to(dtype)
    torch.mm(x, W.t())
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(x, W.t())
        best = min(best, time.perf_counter() - start)
    return best


def _machine_key() -> str:
    """What the decision depends on: the CPU (model and flags), the machine type and torch."""
    model, flags = host.cpu_identity()
    parts = [model, flags, platform.machine(), torch.__version__]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
