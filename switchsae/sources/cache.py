"""Activation caches: build one from a model and a corpus, then read it as an ActivationSource.

:func:`build_cache` runs the model over token windows of a corpus, stopping each forward pass
at the hook, drops the first ``drop_first`` positions of every window (the attention sink),
and writes the rows in shards (format in :mod:`switchsae.sources.shards`). The manifest is
rewritten after every shard, so an interrupted build resumes from its last complete shard. A new
build first runs the model on the corpus's first window, so a wrong model, layer, site or corpus
fails before any file is written; an earlier build that stored no shard never blocks a new one.
Shards hold whole windows, so resuming skips exactly the windows already stored.

:class:`ActivationCache` reads a finished cache. The last 5% of rows (at most 65,536) are
held out for :meth:`~ActivationCache.eval_batches` and never enter the training stream. Opening
one checks every file's size and a sample of shard blocks against their checksums; rows are hashed
and scanned for NaN and inf, 4 MiB block by block (whole shards in caches from before block
checksums), before their first use, ahead of the training stream on a background thread
(:mod:`switchsae.sources.integrity`).

Training-stream shuffle (two levels, so caches larger than memory work; the sizes are a
:class:`~switchsae.sources.activations.Shuffle`): the training rows are cut into chunks of
``chunk_bytes`` within their shards (0: one chunk per shard); each epoch permutes the chunks
with ``(seed, epoch)``; consecutive chunks in that order are grouped until a group holds
``buffer_bytes`` of rows (and at least one batch); a group is read into memory and its rows
permuted with ``(seed, epoch, group)``; batches are consecutive slices of that permutation. The
few rows at the end of a group that do not fill a batch are skipped in that epoch. Every batch
is a function of ``(seed, step)`` and the sizes alone, and starting at step ``i`` reads only the
group that holds batch ``i``. A group's rows are verified before they are read: the first group's
while training waits, each next one's on a background thread while the one before trains (by
block; in a cache without block checksums, every shard the group touches).
"""
from __future__ import annotations

import hashlib
import json
from itertools import islice
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from switchsae.sources import integrity, shards
from switchsae.sources.activations import DEFAULT_SHUFFLE, Shuffle
from switchsae.sources.hooks import HookPoint, as_hook, capture
from switchsae.sources.models import load_model
from switchsae.sources.text import token_windows


def _batches(windows: Iterator[Tensor], batch_size: int) -> Iterator[Tensor]:
    while batch := list(islice(windows, batch_size)):
        yield torch.stack(batch)


def _to_storage(acts: Tensor, dtype: str, hook: HookPoint) -> Tensor:
    """Cast activation rows to the storage dtype, refusing non-finite values and fp16 overflow."""
    if not torch.isfinite(acts).all():
        raise ValueError(f"The model produced NaN or inf activations at {hook.name}.")
    if dtype == "fp16" and (peak := acts.abs().max().item()) > shards.FP16_MAX:
        raise ValueError(f"Activations at {hook.name} reach {peak:.0f}, beyond float16's maximum of "
                         f"{shards.FP16_MAX:.0f}; build the cache with dtype='bf16' or 'fp32'.")
    return acts.to(shards.DTYPES[dtype][0])


def _earlier_build(out: Path, settings: dict, resume: bool) -> dict | None:
    """The manifest of an earlier build in ``out`` with the same settings, or None if there is none."""
    if not (out / shards.MANIFEST).exists():
        return None
    if not resume:
        raise ValueError(f"{out} already holds an activation cache; pass resume=True to continue it, "
                         f"or choose another folder.")
    manifest = shards.read_manifest(out)
    differ = [f"{key} {manifest.get(key)!r} vs {value!r}" for key, value in settings.items()
              if manifest.get(key) != value]
    if differ and not manifest["shards"] and not manifest["complete"]:
        return None  # a build that stored nothing: nothing is lost by starting this one in its place
    if differ:
        raise ValueError(f"{out} holds a cache built with other settings ({'; '.join(differ)}); "
                         f"choose another folder to build this one.")
    shards.verify_shards(out, manifest)
    return manifest


def _tokenizer_info(name: str, tokenizer: PreTrainedTokenizerBase) -> dict:
    return {"name": name, "class": type(tokenizer).__name__, "vocab_size": len(tokenizer),
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}


def build_cache(model_name: str, hook: HookPoint | str, corpus: str | Path, n_tokens: int,
                out_dir: str | Path, *, context_length: int = 128, batch_size: int = 16,
                dtype: str = "bf16", drop_first: int = 1, model_dtype: str = "fp32",
                shard_tokens: int = 262_144, text_field: str = "text", device: str = "cpu",
                resume: bool = True, progress: bool = True) -> Path:
    """Cache ``n_tokens`` activation rows of ``model_name`` at ``hook`` over ``corpus`` in ``out_dir``.

    Returns ``out_dir``. ``dtype`` is the storage dtype, ``model_dtype`` the dtype the model
    runs in (both ``bf16``, ``fp16`` or ``fp32``) on ``device``; ``shard_tokens`` is rounded down
    to whole windows of ``context_length - drop_first`` rows.
    """
    hook = as_hook(hook)
    shards.check_dtype(dtype)
    shards.check_dtype(model_dtype)
    if not 0 <= drop_first < context_length:
        raise ValueError(f"drop_first must be in 0..{context_length - 1} for context_length {context_length}, "
                         f"got {drop_first}.")
    if n_tokens < 1 or batch_size < 1:
        raise ValueError(f"n_tokens and batch_size must be positive, got {n_tokens} and {batch_size}.")
    rows_per_window = context_length - drop_first
    out = Path(out_dir)
    settings = {"model": model_name, "hook": hook.name, "corpus": str(corpus), "text_field": text_field,
                "context_length": context_length, "drop_first": drop_first, "dtype": dtype,
                "model_dtype": model_dtype, "n_tokens": n_tokens,
                "shard_rows": max(1, shard_tokens // rows_per_window) * rows_per_window}
    manifest = _earlier_build(out, settings, resume)
    if manifest is not None and manifest["complete"]:
        return out
    model, tokenizer = load_model(model_name, shards.DTYPES[model_dtype][0])
    model.to(device)
    if manifest is None:
        d_model = _check_start(model, tokenizer, hook, settings)
        manifest = {"format": shards.FORMAT_VERSION, **settings, "d_model": d_model,
                    "tokenizer": _tokenizer_info(model_name, tokenizer), "shards": [], "complete": False}
        out.mkdir(parents=True, exist_ok=True)
        shards.write_manifest(out, manifest)
    _fill(out, manifest, model, tokenizer, hook, batch_size, progress)
    manifest["complete"] = True
    shards.write_manifest(out, manifest)
    return out


def _check_start(model: nn.Module, tokenizer: PreTrainedTokenizerBase, hook: HookPoint, settings: dict) -> int:
    """Fail before a new build writes anything if its corpus yields no window or its hook is not in
    the model: run the model on the corpus's first window up to the hook; return the width there."""
    windows = token_windows(tokenizer, settings["corpus"], settings["context_length"], settings["text_field"])
    return capture(model, hook, next(windows).unsqueeze(0)).shape[-1]


def _fill(out: Path, manifest: dict, model: nn.Module, tokenizer: PreTrainedTokenizerBase, hook: HookPoint,
          batch_size: int, progress: bool) -> None:
    """Run the model over the windows not yet stored and write their rows (and token ids), shard by shard."""
    n_tokens, drop_first = manifest["n_tokens"], manifest["drop_first"]
    per_window = shards.rows_per_window(manifest)
    done = sum(entry["rows"] for entry in manifest["shards"])
    windows = token_windows(tokenizer, manifest["corpus"], manifest["context_length"], manifest["text_field"])
    pending: list[Tensor] = []
    pending_windows: list[Tensor] = []
    with tqdm(total=n_tokens, initial=done, unit="tok", disable=not progress, desc=f"caching {hook.name}") as bar:
        for batch in _batches(islice(windows, done // per_window, None), batch_size):
            rows = capture(model, hook, batch)[:, drop_first:].reshape(-1, manifest["d_model"])
            pending.append(_to_storage(rows, manifest["dtype"], hook).cpu())
            pending_windows.append(batch)
            buffered = sum(len(p) for p in pending)
            bar.update(min(done + buffered, n_tokens) - bar.n)
            if buffered >= min(manifest["shard_rows"], n_tokens - done):
                pending, pending_windows, done = _flush(out, manifest, pending, pending_windows, done)
            if done >= n_tokens:
                return
    raise ValueError(f"Corpus {manifest['corpus']} ran out after {done} of the {n_tokens} activation rows "
                     f"asked for; lower n_tokens or use a larger corpus.")


def _flush(out: Path, manifest: dict, pending: list[Tensor], pending_windows: list[Tensor],
           done: int) -> tuple[list[Tensor], list[Tensor], int]:
    """Write every full shard (and the final, shorter one) from ``pending`` with the token windows
    its rows come from; return what is left."""
    buffered, windows = torch.cat(pending), torch.cat(pending_windows)
    per_window = shards.rows_per_window(manifest)
    while buffered.shape[0] >= (size := min(manifest["shard_rows"], manifest["n_tokens"] - done)) > 0:
        n_windows = -(-size // per_window)
        entry = shards.write_shard(out, len(manifest["shards"]), buffered[:size], windows[:n_windows])
        manifest["shards"].append(entry)
        shards.write_manifest(out, manifest)
        buffered, windows, done = buffered[size:], windows[n_windows:], done + size
    return [buffered], [windows], done


class ActivationCache:
    """A finished activation cache on disk, read as an :class:`ActivationSource` (float32 batches)."""

    def __init__(self, path: str | Path, *, verify: bool = False, eval_fraction: float = 0.05,
                 max_eval_rows: int = 65_536):
        self.path = Path(path)
        self.manifest = shards.read_manifest(self.path)
        if not self.manifest["complete"]:
            stored = sum(entry["rows"] for entry in self.manifest["shards"])
            raise ValueError(f"The activation cache in {self.path} is incomplete ({stored} of "
                             f"{self.manifest['n_tokens']} rows); run build_cache again to resume it.")
        (integrity.check_all if verify else integrity.sample_check)(self.path, self.manifest)
        self._verifier = integrity.FirstUseVerifier(self.path, self.manifest)
        self.d_model: int = self.manifest["d_model"]
        self._dtype = self.manifest["dtype"]
        self._maps = [shards.open_shard(self.path, entry, self.manifest) for entry in self.manifest["shards"]]
        self._offsets = np.cumsum([0] + [len(m) for m in self._maps])
        self.n_tokens = int(self._offsets[-1])
        if self.n_tokens < 2:
            raise ValueError(f"The activation cache in {self.path} holds {self.n_tokens} rows; at least 2 are needed.")
        self.n_train = self.n_tokens - max(1, min(int(self.n_tokens * eval_fraction), max_eval_rows))
        self._row_bytes = self.d_model * self._maps[0].dtype.itemsize
        self.has_token_ids = all("windows" in entry for entry in self.manifest["shards"])
        self._windows: np.ndarray | None = None

    def identity(self) -> dict[str, str]:
        """A fingerprint of the shards' checksums (the data, wherever the folder is), and a description."""
        digest = hashlib.sha256(json.dumps([self._dtype, self.d_model, [entry["sha256"] for entry in
                                                                        self.manifest["shards"]]]).encode())
        return {"fingerprint": digest.hexdigest(), "description": f"the cache in {self.path} ({describe(self.manifest)})"}

    def windows(self) -> np.ndarray:
        """Token ids of every window the cache's rows come from, ``int32 [n_windows, context_length]``
        (window ``w`` holds rows ``[w·R, (w+1)·R)``, ``R`` = rows per window)."""
        if not self.has_token_ids:
            raise ValueError(f"The activation cache in {self.path} stores no token ids (it was built before "
                             f"they were stored); rebuild it with `switchsae cache` to get them.")
        if self._windows is None:
            for entry in self.manifest["shards"]:
                integrity.verify_windows(self.path, entry)
            self._windows = np.concatenate([shards.open_windows(self.path, entry, self.manifest)
                                            for entry in self.manifest["shards"]])
        return self._windows

    def locate(self, rows: np.ndarray | Tensor) -> tuple[np.ndarray, np.ndarray]:
        """``(window, position)`` of global row ids: position counts from the window's BOS."""
        rows = np.asarray(rows, dtype=np.int64)
        per_window = shards.rows_per_window(self.manifest)
        return rows // per_window, rows % per_window + self.manifest["drop_first"]

    def token_ids(self, rows: np.ndarray | Tensor) -> Tensor:
        """The token id each of the global rows ``rows`` is the activation of (int64)."""
        window, position = self.locate(rows)
        return torch.from_numpy(self.windows()[window, position].astype(np.int64))

    def _segments(self, lo: int, hi: int) -> list[tuple[int, int, int]]:
        """Global rows ``[lo, hi)`` as ``(shard, start, stop)`` pieces, one per shard touched."""
        pieces = []
        for shard, (first, end) in enumerate(zip(self._offsets[:-1], self._offsets[1:])):
            start, stop = max(lo, first), min(hi, end)
            if start < stop:
                pieces.append((shard, int(start - first), int(stop - first)))
        return pieces

    def _read(self, segments: list[tuple[int, int, int]]) -> Tensor:
        """The rows of ``segments``, concatenated, in the storage dtype (verified first)."""
        self._verifier.wait(segments)
        return shards.to_tensor(np.concatenate([self._maps[s][a:b] for s, a, b in segments]), self._dtype)

    def _chunks(self, chunk_bytes: int) -> list[tuple[int, int, int]]:
        """The training rows as ``(shard, start, stop)`` chunks of ``chunk_bytes`` (0: one per shard)."""
        pieces = self._segments(0, self.n_train)
        if chunk_bytes == 0:
            return pieces
        rows = max(1, chunk_bytes // self._row_bytes)
        return [(shard, start, min(start + rows, stop)) for shard, first, stop in pieces
                for start in range(first, stop, rows)]

    def _epoch_groups(self, seed: int, epoch: int, batch_size: int,
                      shuffle: Shuffle) -> list[list[tuple[int, int, int]]]:
        """This epoch's shuffled chunk order, cut into groups of about one shuffle buffer each."""
        chunks = self._chunks(shuffle.chunk_bytes)
        order = _rng(seed, epoch).permutation(len(chunks))
        target = max(shuffle.buffer_bytes // self._row_bytes, batch_size)
        groups, current, rows = [], [], 0
        for index in order:
            chunk = chunks[index]
            current.append(chunk)
            rows += chunk[2] - chunk[1]
            if rows >= target:
                groups.append(current)
                current, rows = [], 0
        return groups + [current] if current else groups

    def train_batches(self, batch_size: int, seed: int, start_step: int = 0, token_ids: bool = False,
                      shuffle: Shuffle = DEFAULT_SHUFFLE) -> Iterator[Tensor] | Iterator[tuple[Tensor, Tensor]]:
        """Endless shuffled ``[batch_size, d_model]`` batches; batch ``i`` depends only on ``(seed, i)``
        and ``shuffle``. With ``token_ids``, ``(batch, ids)`` pairs: ``ids: [batch_size]`` the token of each row."""
        if batch_size > self.n_train:
            raise ValueError(f"batch_size {batch_size} exceeds the {self.n_train} training rows of the cache "
                             f"in {self.path}.")
        step, epoch = 0, 0
        while True:
            groups = self._epoch_groups(seed, epoch, batch_size, shuffle)
            counts = [sum(b - a for _, a, b in group) // batch_size for group in groups]
            for index, (group, count) in enumerate(zip(groups, counts)):
                if step + count > start_step:
                    rows = self._read(group)
                    self._verifier.ahead(groups[index + 1] if index + 1 < len(groups) else [])
                    order = torch.from_numpy(_rng(seed, epoch, index).permutation(len(rows)))
                    ids = self.token_ids(self._global_rows(group)) if token_ids else None
                    for j in range(max(0, start_step - step), count):
                        picked = order[j * batch_size:(j + 1) * batch_size]
                        yield (rows[picked].float(), ids[picked]) if ids is not None else rows[picked].float()
                step += count
            epoch += 1

    def _global_rows(self, segments: list[tuple[int, int, int]]) -> np.ndarray:
        """The global row ids of ``segments``, in the order :meth:`_read` returns their rows."""
        return np.concatenate([np.arange(self._offsets[s] + a, self._offsets[s] + b) for s, a, b in segments])

    def read(self, start: int, stop: int) -> Tensor:
        """Global rows ``[start, stop)`` as one float32 ``[stop − start, d_model]`` tensor."""
        if not 0 <= start <= stop <= self.n_tokens:
            raise ValueError(f"rows {start}..{stop} are outside the {self.n_tokens} rows of the cache in {self.path}.")
        return self._read(self._segments(start, stop)).float()

    def eval_batches(self, batch_size: int, token_ids: bool = False) -> Iterator[Tensor] | Iterator[tuple[Tensor, Tensor]]:
        """One ordered pass over the held-out rows, in ``[<=batch_size, d_model]`` float32 batches
        (with ``token_ids``, ``(batch, ids)`` pairs)."""
        for start in range(self.n_train, self.n_tokens, batch_size):
            stop = min(start + batch_size, self.n_tokens)
            rows = self.read(start, stop)
            yield (rows, self.token_ids(np.arange(start, stop))) if token_ids else rows


def _rng(seed: int, *keys: int) -> np.random.Generator:
    """An independent generator for each ``(seed, *keys)``: the keys are a SeedSequence spawn key."""
    return np.random.default_rng(np.random.SeedSequence(seed & 0xFFFF_FFFF_FFFF_FFFF, spawn_key=keys))


def check(path: str | Path) -> dict:
    """Fully verify the cache in ``path`` (completeness, sizes, sha256 checksums of every file, no
    NaN or inf in any shard); return its manifest."""
    return ActivationCache(path, verify=True).manifest


def describe(manifest: dict) -> str:
    """One line naming what a cache holds: rows, width, model, hook, shards."""
    return (f"{sum(entry['rows'] for entry in manifest['shards']):,} rows x {manifest['d_model']} of "
            f"{manifest.get('model', '?')} at {manifest.get('hook', '?')} in {len(manifest['shards'])} shards")


def check_compatible(manifest: dict, model_name: str, hook: HookPoint | str) -> None:
    """Raise if a cache (given by its manifest) was built from another model or hook point."""
    wanted = {"model": model_name, "hook": as_hook(hook).name}
    differ = [f"{key}: cache has '{manifest.get(key)}', asked for '{value}'"
              for key, value in wanted.items() if manifest.get(key) != value]
    if differ:
        raise ValueError(f"The activation cache does not match ({'; '.join(differ)}).")
