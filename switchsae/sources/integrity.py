"""Integrity of an activation cache: its files checked against the sha256 checksums of its manifest.

Three depths, cheapest first:

- **On open** (:func:`sample_check`): every file exists with its size (:func:`shards.verify_shards`),
  and in each shard whose manifest entry lists block checksums (caches built since they were
  added; older ones have none) ``SAMPLED_BLOCKS`` randomly chosen blocks are hashed.
- **On first use** (:class:`FirstUseVerifier`): rows are hashed and scanned for NaN and inf
  before they are used, once per process: by block (:func:`verify_block`) where the shard's entry
  lists block checksums, else the whole shard (:func:`verify_shard`). A file is known by its path,
  size, modification time and inode, so a process that opens the same cache again does not hash it
  again. The training stream verifies its first shuffle buffer's rows while it waits and each next
  buffer's on a background thread while the one before trains; hashing releases the GIL.
- **Full** (:func:`check_all`, ``switchsae cache --check``): every shard and token file hashed,
  every shard scanned.

A shard's rows are read block by block (``BLOCK_BYTES``); each block is hashed and its min and max
taken (NaN and inf propagate into them), so the scan reads the file once. Verifying every block
against its own checksum is the same check as the whole file against its one: both lists come from
the same bytes when the shard was written (:func:`shards.write_shard`).
"""
from __future__ import annotations

import atexit
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

_VERIFIED: set[tuple] = set()  # files of this process that passed, keyed by _file_key (blocks: with their index)
_EXITING = threading.Event()  # set at interpreter exit: background verification stops after its current unit
_WORKERS: set[threading.Thread] = set()  # background verifier threads now running


@atexit.register
def _stop_workers() -> None:
    """Let every background verifier finish its current unit before the interpreter goes down (a daemon
    thread killed inside a torch op aborts the whole process, exit status 134)."""
    _EXITING.set()
    for thread in list(_WORKERS):
        thread.join()


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


_BLOCK_BUFFERS = threading.local()  # each thread reads blocks into one buffer (a new one per block costs its page faults)


def _read_checked_block(folder: Path, entry: dict, block: int) -> memoryview:
    """Block ``block`` of shard ``entry``, checked against its listed sha256: a view of this thread's
    block buffer, valid until the thread reads its next block."""
    size, digests = entry["block_bytes"], entry["block_sha256"]
    buffer = getattr(_BLOCK_BUFFERS, "buffer", None)
    if buffer is None or len(buffer) < size:
        buffer = _BLOCK_BUFFERS.buffer = bytearray(size)
    with (Path(folder) / entry["file"]).open("rb") as handle:
        data = memoryview(buffer)[:os.preadv(handle.fileno(), [memoryview(buffer)[:size]], block * size)]
    if hashlib.sha256(data).hexdigest() != digests[block]:
        raise _corrupt("Shard", entry["file"], folder, f" (block {block} of {len(digests)})")
    return data


def verify_block(folder: Path, manifest: dict, entry: dict, block: int) -> None:
    """Hash block ``block`` of shard ``entry`` against its checksum and scan its rows for NaN and inf;
    a block (or whole shard) that passed before in this process is not read again."""
    file_key = _file_key(Path(folder) / entry["file"])
    if file_key in _VERIFIED or (file_key, block) in _VERIFIED:
        return
    data = _read_checked_block(folder, entry, block)
    dtype = shards.DTYPES[manifest["dtype"]][0]
    _scan_block(data, dtype, block * entry["block_bytes"] // dtype.itemsize, manifest["d_model"], entry["file"],
                Path(folder))
    _VERIFIED.add((file_key, block))


def sample_check(folder: Path, manifest: dict, rng: random.Random | None = None) -> None:
    """The check on open: sizes of every file, and ``SAMPLED_BLOCKS`` random blocks of each shard
    whose entry lists block checksums."""
    shards.verify_shards(folder, manifest)
    rng = rng or random.Random()
    for entry in manifest["shards"]:
        blocks = len(entry.get("block_sha256", ()))
        for block in sorted(rng.sample(range(blocks), min(SAMPLED_BLOCKS, blocks))):
            _read_checked_block(folder, entry, block)


def check_all(folder: Path, manifest: dict) -> None:
    """The full check: sizes, every shard hashed and scanned, every token file hashed."""
    shards.verify_shards(folder, manifest)
    for entry in manifest["shards"]:
        verify_shard(folder, manifest, entry)
        verify_windows(folder, entry)


class FirstUseVerifier:
    """Verifies the rows of one cache once, in units of a block (:func:`verify_block`) or, for a shard
    without block checksums, of the whole shard (:func:`verify_shard`). Rows are named by segments
    ``(shard, start row, stop row)``: :meth:`ahead` queues their units for a background thread,
    :meth:`wait` returns once their units passed (verifying any not yet queued in the calling
    thread) and raises the error of one that failed."""

    def __init__(self, folder: Path, manifest: dict):
        self.folder, self.manifest = Path(folder), manifest
        self._row_bytes = manifest["d_model"] * shards.DTYPES[manifest["dtype"]][0].itemsize
        self._futures: dict[tuple[int, int | None], Future] = {}
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[tuple[int, int | None]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def units(self, segments: list[tuple[int, int, int]]) -> list[tuple[int, int | None]]:
        """``(shard, block)`` units holding the rows of ``segments`` in order (block None: the whole shard)."""
        units: list[tuple[int, int | None]] = []
        for shard, start, stop in segments:
            entry = self.manifest["shards"][shard]
            if "block_sha256" not in entry:
                units.append((shard, None))
            elif stop > start:
                size = entry["block_bytes"]
                units.extend((shard, block) for block in range(start * self._row_bytes // size,
                                                                (stop * self._row_bytes - 1) // size + 1))
        return list(dict.fromkeys(units))

    def _run(self, unit: tuple[int, int | None], future: Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        shard, block = unit
        entry = self.manifest["shards"][shard]
        try:
            if block is None:
                verify_shard(self.folder, self.manifest, entry)
            else:
                verify_block(self.folder, self.manifest, entry, block)
        except BaseException as err:  # handed to the thread that waits for this unit
            future.set_exception(err)
        else:
            future.set_result(None)

    def _work(self) -> None:
        while True:
            with self._lock:  # ahead queues under the same lock: no unit is left behind by a thread that ends
                if self._queue.empty() or _EXITING.is_set():
                    self._thread = None
                    _WORKERS.discard(threading.current_thread())
                    return
                unit = self._queue.get()
            self._run(unit, self._futures[unit])

    def ahead(self, segments: list[tuple[int, int, int]]) -> None:
        """Queue the units of ``segments`` (in the order they will be read) for a background thread, which
        ends when the queue is empty."""
        with self._lock:
            for unit in self.units(segments):
                if unit not in self._futures:
                    self._futures[unit] = Future()
                    self._queue.put(unit)
            if self._thread is None and not self._queue.empty() and not _EXITING.is_set():
                self._thread = threading.Thread(target=self._work, name="switchsae-cache-verifier", daemon=True)
                _WORKERS.add(self._thread)
                self._thread.start()

    def wait(self, segments: list[tuple[int, int, int]]) -> None:
        """Return once every unit of ``segments`` has passed; raise the error of the first that failed."""
        for unit in self.units(segments):
            with self._lock:
                mine = unit not in self._futures
                future = self._futures.setdefault(unit, Future())
            if mine:
                self._run(unit, future)
            future.result()
