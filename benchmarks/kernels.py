"""Each compiled CPU kernel against the torch path it replaces, on the same inputs in one run.

The inputs are those of one Switch SAE training step (d=576, k=32, T=4096 tokens sorted by
expert, M=16,384 latents in 16 experts unless given) and of dense TopK at the same width.
Prints one table: milliseconds per call (best of ``--repeats``) with the compiled kernel and
with ``SWITCHSAE_NATIVE=0``, and their ratio.

    python benchmarks/kernels.py [--width 16384] [--experts 16] [--tokens 4096] [--k 32]
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import torch

from switchsae import host
from switchsae.kernels import core, dispatch, native, sparse
from switchsae.memory import reuse_freed_memory
from switchsae.optim import LazyAdam
from train_speed import best_seconds  # this folder's timing helper (the scripts run from benchmarks/)


def best_ms(run: Callable[[], object], repeats: int) -> float:
    """Fastest of ``repeats`` calls after one warm-up, in milliseconds."""
    run()
    return best_seconds(run, repeats) * 1e3


def adam_step(W: torch.Tensor, rows: torch.Tensor | None, unit_norm: bool) -> Callable[[], None]:
    """Steps of one LazyAdam on a copy of ``W``: the given rows (a row-sparse gradient) or all
    (a dense one), as a ``unit_norm_rows`` decoder group or not."""
    param = torch.nn.Parameter(W.clone())
    if rows is None:
        param.grad = torch.randn(W.shape)
    else:
        param.grad = torch.sparse_coo_tensor(rows[None], torch.randn(rows.numel(), W.shape[1]), W.shape,
                                             is_coalesced=True, check_invariants=False)
    return LazyAdam([{"params": [param], "unit_norm_rows": unit_norm}], lr=1e-4).step


def cases(args: argparse.Namespace) -> dict[str, Callable[[], object]]:
    """The kernels' calls, by name, on a training step's inputs."""
    gen = torch.Generator().manual_seed(0)
    m = args.width // args.experts
    x = torch.randn(args.tokens, args.d_model, generator=gen)
    W = torch.randn(args.width, args.d_model, generator=gen)
    counts = [args.tokens // args.experts] * args.experts
    counts[0] += args.tokens - sum(counts)
    expert = torch.repeat_interleave(torch.arange(args.experts), torch.tensor(counts))
    indices = expert[:, None] * m + torch.randint(0, m, (args.tokens, args.k), generator=gen)
    weights = torch.randn(args.tokens, args.k, generator=gen)
    pre = x @ W.t()
    used = torch.unique(indices)
    return {
        f"expert selection, {args.experts} x {m} (matmul + top-k)":
            lambda: dispatch.grouped_select_topk(x, W, counts, args.k),
        f"top-k of [{args.tokens}, {args.width}] (dense TopK)": lambda: sparse.largest_entries(pre, args.k, x, W),
        "weight gradient (transposed product)": lambda: sparse.weight_grad(weights, indices, x, args.width, False),
        "decoder value gradient (SDDMM)": lambda: sparse.gather_dot(x, W, indices),
        "decoder + residual + loss value gradient (fused core)":
            lambda: core.decode_residual(weights, indices, W, x[0], x, value_grads=True),
        "Adam, all rows": adam_step(W, None, unit_norm=False),
        "decoder Adam, all rows (+ projection, renormalisation)": adam_step(W, None, unit_norm=True),
        f"lazy Adam on {used.numel()} rows": adam_step(W, used, unit_norm=False),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=16384)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--d-model", type=int, default=576)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if not native.available():
        raise SystemExit("compiled kernels unavailable here (see the warning above); nothing to compare")
    reuse_freed_memory()  # as training does on CPU
    print(f"{host.cpu_name()}, threads={torch.get_num_threads()}  T={args.tokens} d={args.d_model} M={args.width} "
          f"N={args.experts} k={args.k}\n")
    print("| kernel | compiled ms | torch ms | speed-up |\n|---|---|---|---|")
    for name, run in cases(args).items():
        compiled = best_ms(run, args.repeats)
        os.environ["SWITCHSAE_NATIVE"] = "0"
        try:
            plain = best_ms(run, args.repeats)
        finally:
            del os.environ["SWITCHSAE_NATIVE"]
        print(f"| {name} | {compiled:.1f} | {plain:.1f} | {plain / compiled:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
