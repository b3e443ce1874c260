"""The on-disk format of an activation cache: raw shard files and the manifest that lists them.

A cache is a folder holding ``manifest.json`` and ``shard_00000.bin``, ``shard_00001.bin``, ...
Each shard is a headerless row-major ``[rows, d_model]`` array, readable with
``numpy.memmap``; bfloat16 rows are stored as their raw 16-bit patterns (``int16``), since
numpy has no bfloat16.

Beside each shard, ``windows_00000.bin`` holds the token ids of the windows its rows come from,
``int32 [ceil(rows / rows_per_window), context_length]`` (the dropped first positions included):
row ``r`` of the cache is position ``drop_first + r mod rows_per_window`` of window
``r div rows_per_window``, so rows map back to text without re-tokenising the corpus. Its
manifest entry names it (``windows``, ``windows_sha256``); caches from before it existed have
no such entry and read as before, without token ids. A shard's entry also lists the sha256 of
each ``block_bytes`` block of its file (``block_sha256``), so that opening a cache can check a
sample of blocks without reading whole shards (:mod:`switchsae.sources.integrity`); caches from
before have none. Every file is written atomically (:func:`switchsae.host.write_atomic`), so a crash never
leaves a half-written shard or manifest under its real name.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from switchsae.host import write_bytes_atomic

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# Storage dtype name -> (torch dtype of the rows, numpy dtype of the raw file).
DTYPES = {"bf16": (torch.bfloat16, np.int16), "fp16": (torch.float16, np.float16),
          "fp32": (torch.float32, np.float32)}
FP16_MAX = float(torch.finfo(torch.float16).max)
#: the unit shards are read in to be verified, and the size of the blocks their entries list checksums of
BLOCK_BYTES = 1 << 22


def check_dtype(dtype: str) -> None:
    """Reject a storage dtype name that is not one of :data:`DTYPES`."""
    if dtype not in DTYPES:
        raise ValueError(f"Unknown cache dtype '{dtype}'; choose one of {', '.join(DTYPES)}.")


def shard_name(index: int) -> str:
    """The file name of shard ``index``."""
    return f"shard_{index:05d}.bin"


def windows_name(index: int) -> str:
    """The file name of the token windows beside shard ``index``."""
    return f"windows_{index:05d}.bin"


def _write_array(path: Path, array: np.ndarray) -> memoryview:
    """Write ``array``'s raw bytes atomically; return them."""
    data = np.ascontiguousarray(array).data.cast("B")
    write_bytes_atomic(path, data)
    return data


def block_digests(data: memoryview, block_bytes: int | None = None) -> list[str]:
    """The sha256 of each ``block_bytes`` (default :data:`BLOCK_BYTES`) block of ``data`` (the last one may be shorter)."""
    block_bytes = block_bytes or BLOCK_BYTES
    return [hashlib.sha256(data[start:start + block_bytes]).hexdigest() for start in range(0, len(data), block_bytes)]


def write_shard(folder: Path, index: int, rows: Tensor, windows: Tensor | None = None) -> dict:
    """Write ``rows`` (already in the storage dtype) as shard ``index``, and the token ids of the
    ``windows: [n, context_length]`` they come from beside it; return its manifest entry."""
    array = rows.contiguous().view(torch.int16).numpy() if rows.dtype == torch.bfloat16 else rows.contiguous().numpy()
    data = _write_array(folder / shard_name(index), array)
    entry = {"file": shard_name(index), "rows": rows.shape[0], "sha256": hashlib.sha256(data).hexdigest(),
             "block_bytes": BLOCK_BYTES, "block_sha256": block_digests(data)}
    if windows is not None:
        digest = hashlib.sha256(_write_array(folder / windows_name(index), windows.to(torch.int32).numpy())).hexdigest()
        entry.update(windows=windows_name(index), windows_sha256=digest)
    return entry


def write_cache(folder: Path, rows: Tensor, shard_rows: int, dtype: str = "fp32") -> Path:
    """A finished cache in ``folder`` of ``rows: [n, d_model]`` held in memory (no model, corpus or
    token ids), cast to storage ``dtype``, in shards of ``shard_rows``; returns ``folder``."""
    check_dtype(dtype)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    entries = [write_shard(folder, i, part.to(DTYPES[dtype][0])) for i, part in enumerate(rows.split(shard_rows))]
    write_manifest(folder, {"format": FORMAT_VERSION, "d_model": rows.shape[1], "dtype": dtype,
                            "n_tokens": rows.shape[0], "shards": entries, "complete": True})
    return folder


def write_manifest(folder: Path, manifest: dict) -> None:
    """Replace the manifest in ``folder`` atomically."""
    write_bytes_atomic(folder / MANIFEST, json.dumps(manifest, indent=1).encode())


def read_manifest(folder: Path) -> dict:
    """The manifest of the cache in ``folder``."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{folder} is not an activation cache: it has no {MANIFEST}.")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the cache is damaged.") from None
    if manifest.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path} has cache format {manifest.get('format')}; this version reads format "
                         f"{FORMAT_VERSION}.")
    return manifest


def rows_per_window(manifest: dict) -> int:
    """Cached rows per token window (its positions after the dropped first ones)."""
    return manifest["context_length"] - manifest["drop_first"]


def windows_in(entry: dict, manifest: dict) -> int:
    """Number of token windows shard ``entry``'s rows come from (the last one may be partial)."""
    return -(-entry["rows"] // rows_per_window(manifest))


def verify_shards(folder: Path, manifest: dict) -> None:
    """Check that every listed shard (and its token windows) exists with the right size (the
    checksums: :mod:`switchsae.sources.integrity`)."""
    row_bytes = manifest["d_model"] * np.dtype(DTYPES[manifest["dtype"]][1]).itemsize
    for entry in manifest["shards"]:
        files = [("Shard", entry["file"], entry["rows"] * row_bytes)]
        if "windows" in entry:
            files.append(("Token file", entry["windows"], windows_in(entry, manifest) * manifest["context_length"] * 4))
        for kind, name, expected in files:
            path = Path(folder) / name
            if not path.exists():
                raise FileNotFoundError(f"{kind} {name} of the cache in {folder} is missing.")
            size = path.stat().st_size
            if size != expected:
                raise ValueError(f"{kind} {name} of the cache in {folder} has {size} bytes, "
                                 f"expected {expected}; it is truncated or corrupt.")


def open_shard(folder: Path, entry: dict, manifest: dict) -> np.memmap:
    """A read-only ``[rows, d_model]`` memory map of one shard, in its raw file dtype."""
    return np.memmap(Path(folder) / entry["file"], dtype=DTYPES[manifest["dtype"]][1], mode="r",
                     shape=(entry["rows"], manifest["d_model"]))


def open_windows(folder: Path, entry: dict, manifest: dict) -> np.memmap:
    """A read-only ``int32 [windows, context_length]`` memory map of the token windows beside a shard."""
    return np.memmap(Path(folder) / entry["windows"], dtype=np.int32, mode="r",
                     shape=(windows_in(entry, manifest), manifest["context_length"]))


def to_tensor(array: np.ndarray, dtype: str) -> Tensor:
    """Rows read from a shard (raw file dtype) as a tensor in the storage dtype."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.view(torch.bfloat16) if dtype == "bf16" else tensor
