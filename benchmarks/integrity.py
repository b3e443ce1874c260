"""What the integrity checks cost: on an activation cache and on a checkpoint.

Prints one table: the check on open (sizes only, and sizes plus sampled blocks), hashing and
scanning one shard and one 4 MiB block, the full check (``switchsae cache --check``), the first
``--batches`` shuffled training batches of a new process (as a run starts) with the first-use
verification, by block and by whole shard (as a cache from before block checksums), and without it
(the verifier switched off), then the same number of batches after them, and a checkpoint of a
TopK SAE of ``--width`` latents: its write and its checksum alone. Shard reads come from the page
cache after the first round; rounds alternate, and each line reports the median round.

    python benchmarks/integrity.py --cache runs/cache_wiki [--batches 64 --batch-size 4096 --width 16384 --rounds 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from switchsae import host
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


def linked_copy(cache: Path, folder: Path, block_checksums: bool) -> Path:
    """``folder``: the cache's shards linked in, its manifest with block checksums (computed here for a
    cache built before them) or without them (as such a cache); no token files."""
    folder.mkdir()
    manifest = shards.read_manifest(cache)
    for entry in manifest["shards"]:
        (folder / entry["file"]).symlink_to((cache / entry["file"]).resolve())
        if block_checksums and "block_sha256" not in entry:
            entry.update(block_bytes=shards.BLOCK_BYTES,
                         block_sha256=shards.block_digests(memoryview((cache / entry["file"]).read_bytes())))
        for key in ("windows",) if block_checksums else ("windows", "block_bytes", "block_sha256"):
            entry.pop(key, None)
    (folder / shards.MANIFEST).write_text(json.dumps(manifest))
    return folder


STREAM = """
import sys, time
from itertools import islice
from switchsae.sources import integrity
from switchsae.sources.cache import ActivationCache
folder, batches, batch_size, verify = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
if not verify:
    integrity.verify_shard = integrity.verify_block = lambda *args: None
cpu, start = time.process_time(), time.perf_counter()
stream = ActivationCache(folder).train_batches(batch_size, seed=0)
list(islice(stream, batches))
first = time.perf_counter() - start
list(islice(stream, batches))
print(first, time.perf_counter() - start - first, time.process_time() - cpu)
"""


def stream(cache: Path, batches: int, batch_size: int, verify: bool) -> tuple[float, float, float]:
    """In a new process (as a training run starts): seconds for the first ``batches`` batches, then for
    the next ``batches``, and the process's CPU seconds (all threads) for both."""
    done = subprocess.run([sys.executable, "-c", STREAM, str(cache), str(batches), str(batch_size), str(int(verify))],
                          capture_output=True, text=True, check=True)
    first, then, cpu = map(float, done.stdout.split())
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
        by_block = linked_copy(args.cache, Path(tmp) / "blocks", block_checksums=True)
        by_shard = linked_copy(args.cache, Path(tmp) / "shards", block_checksums=False)
        block_manifest = shards.read_manifest(by_block)
        for _ in range(args.rounds):
            record("open: sizes only", seconds(lambda: ActivationCache(by_shard)))
            record(f"open: sizes + {integrity.SAMPLED_BLOCKS} sampled 4 MiB blocks per shard",
                   seconds(lambda: ActivationCache(by_block)))
            integrity._VERIFIED.clear()
            record(f"hash + NaN scan of one shard ({entry['rows']:,} rows)",
                   seconds(lambda: integrity.verify_shard(args.cache, manifest, entry)))
            integrity._VERIFIED.clear()
            record("hash + NaN scan of one 4 MiB block",
                   seconds(lambda: integrity.verify_block(by_block, block_manifest, block_manifest["shards"][0], 1)))
            integrity._VERIFIED.clear()
            record("full check (cache --check)", seconds(lambda: check(args.cache)))
            for label, folder, verify in (("verified by block", by_block, True),
                                          ("verified by shard (a cache without block checksums)", by_shard, True),
                                          ("verifier off", by_shard, False)):
                first, then, cpu = stream(folder, args.batches, args.batch_size, verify)
                record(f"first {args.batches} batches of {args.batch_size}, {label}", first)
                record(f"next {args.batches} batches, {label}", then)
                record(f"CPU seconds of both, {label}", cpu)
            write, digest, size = checkpoint_costs(args.width, manifest["d_model"], Path(tmp))
            record(f"checkpoint of TopK-{args.width} ({size / 2**20:.0f} MiB): write incl. checksum", write)
            record(f"checkpoint of TopK-{args.width}: checksum alone", digest)
    print(f"\n{manifest['n_tokens']:,} rows x {manifest['d_model']} {manifest['dtype']} in {len(manifest['shards'])} "
          f"shards, {host.cpu_name()}, {torch.get_num_threads()} torch threads; median of {args.rounds} rounds\n")
    print("| what | seconds |\n|---|---|")
    for name, values in rows.items():
        print(f"| {name} | {statistics.median(values):.3f} |")


if __name__ == "__main__":
    main()
