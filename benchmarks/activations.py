"""Activation throughput and cache cost for SmolLM2-135M, layer 10 resid_post.

Prints three tables: tokens/s of the early-stopped capture against a full forward pass, with
fp32 and bf16 weights; cache size on disk per million tokens for each storage dtype; and the
time to draw one shuffled training batch from a cache.

    python benchmarks/activations.py [--corpus wiki-vital] [--windows 32] [--context 128] [--threads N]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from itertools import islice
from pathlib import Path

import torch

from switchsae import host
from switchsae.sources import shards
from switchsae.sources.cache import ActivationCache, build_cache
from switchsae.sources.hooks import HookPoint, capture
from switchsae.sources.models import load_model
from switchsae.sources.text import take_windows

MODEL, HOOK = "smollm2-135m", HookPoint(10, "resid_post")


def tokens_per_second(run, batches: list[torch.Tensor], repeats: int = 3) -> float:
    """Throughput of ``run`` over ``batches``: the best of ``repeats`` passes, after one warm-up batch."""
    run(batches[0])
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for batch in batches:
            run(batch)
        best = min(best, time.perf_counter() - start)
    return sum(b.numel() for b in batches) / best


def throughput_table(corpus: str, n_windows: int, context: int, batch_size: int) -> None:
    """Tokens/s of early-stopped capture and of a full forward, with fp32 and bf16 weights."""
    print(f"| weights | capture to layer {HOOK.layer} (tok/s) | full forward (tok/s) | speed-up |")
    print("|---|---|---|---|")
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model, tokenizer = load_model(MODEL, dtype)
        batches = list(take_windows(tokenizer, corpus, context, n_windows).split(batch_size))
        early = tokens_per_second(lambda ids, model=model: capture(model, HOOK, ids), batches)
        with torch.inference_mode():
            full = tokens_per_second(lambda ids, model=model: model(input_ids=ids, use_cache=False), batches)
        print(f"| {name} | {early:,.0f} | {full:,.0f} | {early / full:.2f}x |")


def size_table(corpus: str, context: int, n_tokens: int) -> None:
    """Bytes on disk per million tokens, measured on a small cache of each storage dtype."""
    print("\n| cache dtype | bytes on disk per 1M tokens |")
    print("|---|---|")
    for dtype in shards.DTYPES:
        with tempfile.TemporaryDirectory() as tmp:
            out = build_cache(MODEL, HOOK, corpus, n_tokens, Path(tmp) / "acts", context_length=context,
                              dtype=dtype, model_dtype="bf16", progress=False)
            size = sum(f.stat().st_size for f in out.iterdir())
        print(f"| {dtype} | {size / n_tokens * 1e6 / 2**20:,.0f} MiB |")


def read_table(batch_size: int = 4096, rows: int = 600_000, d_model: int = 576) -> None:
    """Milliseconds per shuffled training batch from a synthetic cache of each storage dtype."""
    print(f"\n| cache dtype | ms per shuffled {batch_size}x{d_model} batch (incl. shard-group loads) |")
    print("|---|---|")
    for dtype in shards.DTYPES:
        with tempfile.TemporaryDirectory() as tmp:
            shards.write_cache(Path(tmp), torch.randn(rows, d_model), 262_144, dtype)
            stream = ActivationCache(tmp).train_batches(batch_size, seed=0)
            count = 300
            start = time.perf_counter()
            for _ in islice(stream, count):
                pass
            print(f"| {dtype} | {(time.perf_counter() - start) / count * 1e3:.1f} |")


def main() -> None:
    """Parse the options and print the three tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default="wiki-vital", help="corpus to read windows from")
    parser.add_argument("--windows", type=int, default=32, help="windows timed per configuration")
    parser.add_argument("--context", type=int, default=128, help="tokens per window")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"{MODEL}, {HOOK.name}, {args.windows} windows of {args.context} tokens, "
          f"batch {args.batch_size}, {host.cpu_name()}, {torch.get_num_threads()} threads\n")
    throughput_table(args.corpus, args.windows, args.context, args.batch_size)
    size_table(args.corpus, args.context, n_tokens=8192)
    read_table()


if __name__ == "__main__":
    main()
