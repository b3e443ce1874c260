"""Cache integrity: the sampled check on open, rows hashed and scanned before their first use (by
block, or by shard in caches without block checksums; ahead, on a background thread), the full
check; NaN/inf refused; what a cache is (its identity)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from itertools import islice
from pathlib import Path

import pytest
import torch

from switchsae.sources import integrity, shards
from switchsae.sources.activations import Shuffle, TensorSource
from switchsae.sources.cache import ActivationCache, check
from switchsae.sources.shards import write_cache


def flip_byte(path: Path, offset: int) -> None:
    with path.open("r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))


def without_block_checksums(folder: Path) -> None:
    """Make the manifest look like one from before block checksums existed."""
    manifest = shards.read_manifest(folder)
    for entry in manifest["shards"]:
        del entry["block_bytes"], entry["block_sha256"]
    shards.write_manifest(folder, manifest)


@pytest.fixture
def cache(tmp_path):
    return write_cache(tmp_path / "cache", torch.randn(4000, 8, generator=torch.Generator().manual_seed(0)), 1000)


def test_block_checksums_cover_the_whole_shard(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "BLOCK_BYTES", 1024)
    folder = write_cache(tmp_path / "c", torch.randn(300, 4), 300)  # 4,800 bytes: blocks of 1024 x 4 + 704
    entry = shards.read_manifest(folder)["shards"][0]
    assert entry["block_bytes"] == 1024 and len(entry["block_sha256"]) == 5
    data = memoryview((folder / entry["file"]).read_bytes())
    assert entry["block_sha256"] == shards.block_digests(data, 1024)


def test_the_check_on_open_samples_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "BLOCK_BYTES", 1024)
    folder = write_cache(tmp_path / "c", torch.randn(2000, 4), 1000)  # 16 blocks per shard
    flip_byte(folder / "shard_00001.bin", 5 * 1024 + 7)  # block 5 of shard 1
    sampled = [0]

    class Picks:  # a random.Random that picks block 5 once, then block 0
        def sample(self, population, count):
            sampled[0] += 1
            return [5] if sampled[0] == 2 else [0]
    monkeypatch.setattr(integrity, "SAMPLED_BLOCKS", 1)
    with pytest.raises(ValueError, match="shard_00001.bin .* fails its sha256 check \\(block 5 of 16\\)"):
        integrity.sample_check(folder, shards.read_manifest(folder), Picks())
    sampled[0] = 2  # from here on block 0 only: the damage is not seen on open ...
    monkeypatch.setattr(integrity.random, "Random", Picks)  # the open's own sampler, too
    cache = ActivationCache(folder)
    assert cache.read(1500, 1510).shape == (10, 4)  # ... rows of shard 1's block 7 are intact ...
    with pytest.raises(ValueError, match="shard_00001.bin .* fails its sha256 check \\(block 5 of 16\\)"):
        cache.read(1300, 1330)  # ... but block 5 fails on first use (16-byte rows 1320-1383 of the cache)
    assert cache.read(0, 10).shape == (10, 4)  # shard 0 is intact


def test_the_stream_verifies_every_block_it_reads_before_using_it(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "BLOCK_BYTES", 1024)
    folder = write_cache(tmp_path / "c", torch.randn(8000, 4), 2000)  # 32 blocks of 64 rows per shard
    verified = set()
    real = integrity.verify_block
    monkeypatch.setattr(integrity, "verify_block", lambda f, m, entry, block: verified.add((entry["file"], block))
                        or real(f, m, entry, block))
    cache = ActivationCache(folder)
    shuffle = Shuffle(buffer_bytes=16 * 1024, chunk_bytes=2048)  # groups of 8 chunks of 128 rows
    next(cache.train_batches(64, seed=3, shuffle=shuffle))
    first_group = cache._epoch_groups(3, 0, 64, shuffle)[0]
    wanted = {(f"shard_{shard:05d}.bin", block) for shard, block in cache._verifier.units(first_group)}
    assert len(wanted) == 16 and wanted <= verified  # two blocks per chunk, all of them checked before use
    flip_byte(folder / "shard_00003.bin", 9 * 1024 + 5)  # a block the stream has not reached yet (same inode)
    integrity._VERIFIED.clear()
    with pytest.raises(ValueError, match="shard_00003.bin .* fails its sha256 check \\(block 9 of 32\\)"):
        list(islice(ActivationCache(folder).train_batches(64, seed=3, shuffle=shuffle), 200))


def test_a_shard_is_verified_before_its_first_rows_are_used(cache):
    without_block_checksums(cache)  # an older cache: nothing to sample on open
    flip_byte(cache / "shard_00002.bin", 333)
    opened = ActivationCache(cache)  # sizes are right
    with pytest.raises(ValueError, match="Shard shard_00002.bin .* fails its sha256 check"):
        list(islice(opened.train_batches(100, seed=0), 40))  # one epoch reads every training shard
    with pytest.raises(ValueError, match="Shard shard_00002.bin .* fails its sha256 check"):
        check(cache)


@pytest.mark.parametrize("blocks", [True, False])
def test_the_verifier_works_ahead_and_reports_only_the_damaged_unit(cache, blocks):
    if not blocks:
        without_block_checksums(cache)
    flip_byte(cache / "shard_00003.bin", 10)
    manifest = shards.read_manifest(cache)
    verifier = integrity.FirstUseVerifier(cache, manifest)
    whole = [(shard, 0, 1000) for shard in range(4)]
    assert verifier.units(whole) == [(shard, 0 if blocks else None) for shard in range(4)]  # 32 kB shards
    verifier.ahead(whole)
    verifier.wait(whole[:3])
    with pytest.raises(ValueError, match="shard_00003.bin"):
        verifier.wait([(3, 500, 501)])
    with pytest.raises(ValueError, match="shard_00003.bin"):  # and every later wait on it
        verifier.wait([(3, 0, 1)])


def test_a_shard_is_hashed_once_per_process(cache, monkeypatch):
    hashed = []
    real = integrity._scan_block
    monkeypatch.setattr(integrity, "_scan_block", lambda *args: hashed.append(1) or real(*args))
    for _ in range(3):
        opened = ActivationCache(cache)
        list(islice(opened.train_batches(100, seed=0), 40))
    assert len(hashed) == 4  # four shards of 32 kB: one block each, read once


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_and_inf_in_a_shard_are_refused_with_their_row(tmp_path, dtype, bad):
    rows = torch.randn(4000, 8)
    rows[2345, 3] = bad  # shard 2, row 345
    folder = write_cache(tmp_path / "c", rows, 1000, dtype)  # checksums of the bad values: they pass
    opened = ActivationCache(folder)
    with pytest.raises(ValueError, match="Shard shard_00002.bin .* holds NaN or inf values \\(first at row 345 "):
        list(islice(opened.train_batches(100, seed=0), 40))
    with pytest.raises(ValueError, match="holds NaN or inf values"):
        check(folder)


def test_a_damaged_token_file_fails_its_checksum(tmp_path):
    folder = write_cache(tmp_path / "c", torch.randn(100, 4), 100)
    manifest = shards.read_manifest(folder)
    entry = shards.write_shard(folder, 0, torch.randn(100, 4), torch.arange(40).reshape(4, 10))
    manifest.update(shards=[entry], context_length=10, drop_first=0)  # 10 rows per window, 10 windows
    shards.write_manifest(folder, manifest)
    with pytest.raises(ValueError, match="Token file windows_00000.bin .* truncated or corrupt"):
        ActivationCache(folder)  # 4 windows stored, 10 expected
    entry = shards.write_shard(folder, 0, torch.randn(100, 4), torch.arange(100).reshape(10, 10))
    manifest.update(shards=[entry])
    shards.write_manifest(folder, manifest)
    flip_byte(folder / "windows_00000.bin", 20)
    opened = ActivationCache(folder)
    with pytest.raises(ValueError, match="Token file windows_00000.bin .* fails its sha256 check"):
        opened.windows()


def test_the_identity_of_a_cache_is_its_data_not_its_folder(cache, tmp_path):
    moved = tmp_path / "elsewhere"
    shutil.copytree(cache, moved)
    same, other = ActivationCache(cache).identity(), ActivationCache(moved).identity()
    assert same["fingerprint"] == other["fingerprint"] and "4,000 rows x 8" in same["description"]
    different = write_cache(tmp_path / "d", torch.randn(4000, 8), 1000)
    assert ActivationCache(different).identity()["fingerprint"] != same["fingerprint"]


def test_the_identity_of_a_tensor_tells_data_sets_apart():
    acts = torch.randn(5000, 8)
    assert TensorSource(acts).identity() == TensorSource(acts.clone()).identity()
    changed = acts.clone()
    changed[4999, 0] += 1  # the last row is always among the sampled ones
    assert TensorSource(changed).identity()["fingerprint"] != TensorSource(acts).identity()["fingerprint"]
    assert TensorSource(acts.double()).identity()["fingerprint"] != TensorSource(acts).identity()["fingerprint"]


def test_a_process_exits_cleanly_while_the_verifier_works_ahead(cache, tmp_path):
    """A daemon thread killed inside a torch op at interpreter exit can abort the process (status 134):
    at exit the background verifier finishes the unit it is in, then stops (the rest stays queued)."""
    done_file = tmp_path / "units_done"
    code = f"""
import threading, torch
from switchsae.sources import integrity
from switchsae.sources.cache import ActivationCache
started, values = threading.Event(), torch.randn(2_000_000).bfloat16()
def slow(*args):  # stands in for scanning a large block
    started.set()
    for _ in range(1000):
        torch.aminmax(values)
    with open({str(done_file)!r}, "a") as out:
        out.write("1")
integrity.verify_block = slow
cache = ActivationCache({str(cache)!r})
cache._verifier.ahead([(shard, 0, 1000) for shard in range(4)])
started.wait()
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done_file.read_text() == "1"
