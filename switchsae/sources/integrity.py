"""Integrity of an activation cache: its files checked against the sha256 checksums of its manifest.

Three depths, cheapest first:

- **On open** (:func:`sample_check`): every file exists with its size (:func:`shards.verify_shards`),
  and in each shard whose manifest entry lists block checksums (caches built since they were
  added; older ones have none) ``SAMPLED_BLOCKS`` randomly chosen blocks are hashed.
- **On first use** (:class:`ShardVerifier`): a whole shard is hashed and scanned for NaN and inf
  before its rows are used, once per process (a file is known by its path, size, modification
  time and inode, so a process that opens the same cache again does not hash it again). The
  verifier works ahead on a background thread through the shards the training stream reads
  next, so training waits only for the shards its first shuffle buffer draws from (with chunks
  from anywhere in the cache, most of a small cache's shards); hashing releases the GIL.
- **Full** (:func:`check_all`, ``switchsae cache --check``): every shard and token file hashed,
  every shard scanned.

A shard's rows are read block by block (``BLOCK_BYTES``); each block is hashed and its min and max
taken (NaN and inf propagate into them), so the scan reads the file once.
"""
from __future__ import annotations

import hashlib
import os
import queue
import random
import threading
from concurrent.futures import Future
from pathlib import Path

import torch

from switchsae.sources import shards

#: blocks hashed per shard when a cache is opened (where the manifest lists block checksums)
SAMPLED_BLOCKS = 2

_VERIFIED: set[tuple] = set()  # files of this process that passed, keyed by _file_key


def _file_key(path: Path) -> tuple:
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino


def _corrupt(kind: str, name: str, folder: Path, where: str = "") -> ValueError:
    return ValueError(f"{kind} {name} of the cache in {folder} fails its sha256 check{where}; it is corrupt "
                      "(rebuild the cache, or copy it again)")


def _scan_block(block: memoryview, dtype: torch.dtype, first_element: int, d_model: int, name: str,
                folder: Path) -> None:
    """Raise if the rows in ``block`` (raw bytes of ``dtype`` values) hold NaN or inf."""
    values = torch.frombuffer(block, dtype=dtype)
    low, high = torch.aminmax(values)
    if torch.isfinite(low) and torch.isfinite(high):
        return
    element = first_element + int((~torch.isfinite(values)).nonzero()[0, 0])
    raise ValueError(f"Shard {name} of the cache in {folder} holds NaN or inf values (first at row "
                     f"{element // d_model} of the shard); the cache is damaged: rebuild it")


def verify_file(folder: Path, kind: str, name: str, digest: str, rows_dtype: torch.dtype | None = None,
                d_model: int = 0) -> None:
    """Hash ``folder/name`` against ``digest`` (and with ``rows_dtype``, scan its values for NaN and inf);
    a file that passed before in this process is not read again."""
    path = Path(folder) / name
    key = _file_key(path)
    if key in _VERIFIED:
        return
    hasher = hashlib.sha256()
    buffer = bytearray(shards.BLOCK_BYTES)
    offset = 0
    with path.open("rb") as handle:
        while size := handle.readinto(buffer):
            block = memoryview(buffer)[:size]
            hasher.update(block)
            if rows_dtype is not None:
                _scan_block(block, rows_dtype, offset // rows_dtype.itemsize, d_model, name, folder)
            offset += size
    if hasher.hexdigest() != digest:
        raise _corrupt(kind, name, folder)
    _VERIFIED.add(key)


def verify_shard(folder: Path, manifest: dict, entry: dict) -> None:
    """Hash shard ``entry`` against its checksum and scan its rows for NaN and inf."""
    verify_file(folder, "Shard", entry["file"], entry["sha256"], shards.DTYPES[manifest["dtype"]][0],
                manifest["d_model"])


def verify_windows(folder: Path, entry: dict) -> None:
    """Hash the token file beside shard ``entry`` against its checksum (if it has one)."""
    if "windows" in entry:
        verify_file(folder, "Token file", entry["windows"], entry["windows_sha256"])


def sample_check(folder: Path, manifest: dict, rng: random.Random | None = None) -> None:
    """The check on open: sizes of every file, and ``SAMPLED_BLOCKS`` random blocks of each shard
    whose entry lists block checksums."""
    shards.verify_shards(folder, manifest)
    rng = rng or random.Random()
    for entry in manifest["shards"]:
        digests = entry.get("block_sha256")
        if not digests:
            continue
        with (Path(folder) / entry["file"]).open("rb") as handle:
            for block in sorted(rng.sample(range(len(digests)), min(SAMPLED_BLOCKS, len(digests)))):
                data = os.pread(handle.fileno(), entry["block_bytes"], block * entry["block_bytes"])
                if hashlib.sha256(data).hexdigest() != digests[block]:
                    raise _corrupt("Shard", entry["file"], folder, f" (block {block} of {len(digests)})")


def check_all(folder: Path, manifest: dict) -> None:
    """The full check: sizes, every shard hashed and scanned, every token file hashed."""
    shards.verify_shards(folder, manifest)
    for entry in manifest["shards"]:
        verify_shard(folder, manifest, entry)
        verify_windows(folder, entry)


class ShardVerifier:
    """Verifies each shard of one cache (:func:`verify_shard`) once: :meth:`ahead` queues shards for
    a background thread, :meth:`wait` returns once the given shards passed (verifying any not yet
    queued in the calling thread) and raises the error of one that failed."""

    def __init__(self, folder: Path, manifest: dict):
        self.folder, self.manifest = Path(folder), manifest
        self._futures: dict[int, Future] = {}
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def _run(self, index: int, future: Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            verify_shard(self.folder, self.manifest, self.manifest["shards"][index])
        except BaseException as err:  # handed to the thread that waits for this shard
            future.set_exception(err)
        else:
            future.set_result(None)

    def _work(self) -> None:
        while True:
            index = self._queue.get()
            self._run(index, self._futures[index])

    def ahead(self, indices: list[int]) -> None:
        """Queue shards (in the order they will be used) for verification on the background thread."""
        with self._lock:
            for index in indices:
                if index not in self._futures:
                    self._futures[index] = Future()
                    self._queue.put(index)
            if self._thread is None and self._futures:
                self._thread = threading.Thread(target=self._work, name="switchsae-shard-verifier", daemon=True)
                self._thread.start()

    def wait(self, indices: list[int]) -> None:
        """Return once every shard in ``indices`` has passed; raise the error of the first that failed."""
        for index in indices:
            with self._lock:
                mine = index not in self._futures
                future = self._futures.setdefault(index, Future())
            if mine:
                self._run(index, future)
            future.result()
