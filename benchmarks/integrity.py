"""What the integrity checks cost: on an activation cache and on a checkpoint.

Prints one table: the check on open (sizes only, and sizes plus sampled blocks), hashing and
scanning one shard, the full check (``switchsae cache --check``), the first ``--batches`` shuffled
training batches with the first-use verification and without it (the verifier switched off), the
same number of batches once every shard has been verified (steady state), and a checkpoint of a
TopK SAE of ``--width`` latents: its write and its checksum alone. Shard reads come from the page
cache after the first round; rounds alternate, and each line reports the median round.

    python benchmarks/integrity.py --cache runs/cache_wiki [--batches 64 --batch-size 4096 --width 16384 --rounds 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from itertools import islice
from pathlib import Path

import torch

from switchsae.checkpoint import TrainState, checkpoint_digest, save_checkpoint
from switchsae.config import SAEConfig, TrainConfig
from switchsae.saes import build_sae
from switchsae.sources import integrity, shards
from switchsae.sources.cache import ActivationCache, check
from switchsae.train import optimizer_for


def seconds(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def with_block_checksums(cache: Path, folder: Path) -> Path:
    """``folder``: the cache's shards linked in, its manifest with block checksums (for caches built before them)."""
    manifest = shards.read_manifest(cache)
    for entry in manifest["shards"]:
        (folder / entry["file"]).symlink_to((cache / entry["file"]).resolve())
        entry.update(block_bytes=shards.BLOCK_BYTES,
                     block_sha256=shards.block_digests(memoryview((cache / entry["file"]).read_bytes())))
        entry.pop("windows", None)
    (folder / shards.MANIFEST).write_text(json.dumps(manifest))
    return folder


def stream(cache: Path, batches: int, batch_size: int, verify: bool) -> tuple[float, float, float]:
    """Seconds for the first ``batches`` batches of a fresh open, then for the next ``batches``, and the
    process's CPU seconds (all threads) for both."""
    integrity._VERIFIED.clear()
    real = integrity.verify_shard
    if not verify:
        integrity.verify_shard = lambda *args: None
    try:
        cpu = time.process_time()
        batches_iter = ActivationCache(cache).train_batches(batch_size, seed=0)
        first = seconds(lambda: list(islice(batches_iter, batches)))
        then = seconds(lambda: list(islice(batches_iter, batches)))
        cpu = time.process_time() - cpu
    finally:
        integrity.verify_shard = real
    return first, then, cpu


def checkpoint_costs(width: int, d_model: int, folder: Path) -> tuple[float, float, int]:
    """Seconds to write a checkpoint (checksum included), seconds of its checksum alone, and its bytes."""
    sae = build_sae(SAEConfig(arch="topk", d_model=d_model, width=width, k=32))
    opt = optimizer_for(sae, TrainConfig())
    sae(torch.randn(64, d_model)).x_hat.sum().backward()
    opt.step()
    path = folder / "checkpoint.safetensors"
    write = seconds(lambda: save_checkpoint(path, sae, opt, TrainState(1), {}))
    tensors = {**{f"sae/{n}": t for n, t in sae.state_dict().items()},
               **{f"adam/{i}/{k}": v for i, s in enumerate(opt.state.values()) for k, v in s.items()}}
    return write, seconds(lambda: checkpoint_digest(tensors, {})), path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--batches", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--width", type=int, default=16384)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    manifest = shards.read_manifest(args.cache)
    entry = manifest["shards"][0]
    rows: dict[str, list[float]] = {}

    def record(name: str, value: float) -> None:
        rows.setdefault(name, []).append(value)
    with tempfile.TemporaryDirectory() as tmp:
        sampled = with_block_checksums(args.cache, Path(tmp))
        for _ in range(args.rounds):
            record("open: sizes only", seconds(lambda: ActivationCache(args.cache)))
            record(f"open: sizes + {integrity.SAMPLED_BLOCKS} sampled 4 MiB blocks per shard",
                   seconds(lambda: ActivationCache(sampled)))
            integrity._VERIFIED.clear()
            record(f"hash + NaN scan of one shard ({entry['rows']:,} rows)",
                   seconds(lambda: integrity.verify_shard(args.cache, manifest, entry)))
            integrity._VERIFIED.clear()
            record("full check (cache --check)", seconds(lambda: check(args.cache)))
            for verify in (True, False):
                first, then, cpu = stream(args.cache, args.batches, args.batch_size, verify)
                label = "with first-use verification" if verify else "verifier off"
                record(f"first {args.batches} batches of {args.batch_size}, {label}", first)
                record(f"next {args.batches} batches (steady state), {label}", then)
                record(f"CPU seconds of both, {label}", cpu)
            write, digest, size = checkpoint_costs(args.width, manifest["d_model"], Path(tmp))
            record(f"checkpoint of TopK-{args.width} ({size / 2**20:.0f} MiB): write incl. checksum", write)
            record(f"checkpoint of TopK-{args.width}: checksum alone", digest)
    print(f"\n{manifest['n_tokens']:,} rows x {manifest['d_model']} {manifest['dtype']} in {len(manifest['shards'])} "
          f"shards, {torch.get_num_threads()} torch threads; median of {args.rounds} rounds\n")
    print("| what | seconds |\n|---|---|")
    for name, values in rows.items():
        print(f"| {name} | {statistics.median(values):.3f} |")


if __name__ == "__main__":
    main()
