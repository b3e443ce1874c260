"""The one interface the trainer and evaluator read activations through.

An :class:`ActivationSource` is anything that yields ``[batch, d_model]`` float32 batches:
an in-memory tensor (:class:`TensorSource`, also used for ``.safetensors``/``.npy`` files) or
an on-disk activation cache (:class:`switchsae.sources.cache.ActivationCache`).

Contract of ``train_batches(batch_size, seed, start_step, shuffle=...)``: an endless, shuffled
stream that is a pure function of ``(seed, step)`` and the :class:`Shuffle` (the trainer passes
the run's; a source in memory may ignore it); batch ``i`` is the same whether the stream was
started at step 0 or at step ``i``. That is what makes a resumed run identical to an
uninterrupted one. ``eval_batches(batch_size)`` makes one ordered pass over the held-out rows,
which never appear in the training stream.

A source may also say what it holds (``identity()``: a fingerprint of the data and a
description; see :func:`source_identity`): checkpoints record it, and a resume on other
activations is refused.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class Shuffle:
    """How a source larger than memory (an activation cache) mixes its training rows: they are cut
    into chunks of ``chunk_bytes`` (0: whole shards), each epoch permutes the chunks, consecutive
    chunks of that order fill buffers of ``buffer_bytes``, and each buffer's rows are permuted. A
    buffer thus holds ``buffer_bytes / chunk_bytes`` pieces from anywhere in the cache, so a
    corpus stored in order (book after book) does not train in blocks. A source in memory
    permutes all of its rows each epoch, whatever this says."""

    buffer_bytes: int = 1 << 30
    chunk_bytes: int = 16 << 20


#: the stream's default sizes (TrainConfig's shuffle_buffer_mb and shuffle_chunk_mb)
DEFAULT_SHUFFLE = Shuffle()


@runtime_checkable
class ActivationSource(Protocol):
    """Batches are ``[batch, d_model]`` tensors; with ``token_ids`` (a source that stores them, such
    as an activation cache; others refuse) ``(batch, ids)`` pairs."""

    d_model: int

    def train_batches(self, batch_size: int, seed: int, start_step: int = 0, token_ids: bool = False,
                      shuffle: Shuffle = DEFAULT_SHUFFLE) -> Iterator[Any]: ...

    def eval_batches(self, batch_size: int, token_ids: bool = False) -> Iterator[Any]: ...


class TensorSource:
    """Activations held in memory as one ``[n, d]`` tensor; the last ``eval_rows`` are held out."""

    def __init__(self, acts: Tensor, eval_fraction: float = 0.1, max_eval_rows: int = 65_536):
        if acts.ndim != 2:
            raise ValueError(f"activations must be a 2-D [tokens, d_model] tensor, got shape {tuple(acts.shape)}")
        if acts.shape[0] < 2:
            raise ValueError(f"activations hold {acts.shape[0]} rows; at least 2 are needed (train and held-out)")
        if not acts.dtype.is_floating_point:
            raise ValueError(f"activations must be floating point, got {acts.dtype}")
        if not torch.isfinite(acts).all():
            bad = (~torch.isfinite(acts)).any(dim=1).nonzero()[0].item()
            raise ValueError(f"activations contain NaN or inf values (first at row {bad})")
        self._acts = acts
        n_eval = max(1, min(int(acts.shape[0] * eval_fraction), max_eval_rows))
        self.train = acts[:-n_eval]
        self.held_out = acts[-n_eval:]
        self.d_model = acts.shape[1]

    def train_batches(self, batch_size: int, seed: int, start_step: int = 0, token_ids: bool = False,
                      shuffle: Shuffle = DEFAULT_SHUFFLE) -> Iterator[Tensor]:
        """Each epoch a permutation of every training row (``shuffle`` has nothing to cut: all rows are in memory)."""
        _refuse_token_ids(token_ids)
        n = self.train.shape[0]
        per_epoch = max(1, n // batch_size)
        step = start_step
        while True:
            epoch, offset = divmod(step, per_epoch)
            epoch_seed = (seed * 1_000_003 + epoch) % 2**64  # any seed below 2**63 fits the generator
            order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed))
            for i in range(offset, per_epoch):
                idx = order[i * batch_size:(i + 1) * batch_size]
                yield self.train[idx].float()
            step = (epoch + 1) * per_epoch

    def eval_batches(self, batch_size: int, token_ids: bool = False) -> Iterator[Tensor]:
        _refuse_token_ids(token_ids)
        for start in range(0, self.held_out.shape[0], batch_size):
            yield self.held_out[start:start + batch_size].float()

    def identity(self) -> dict[str, str]:
        """A fingerprint of the shape, dtype and ``IDENTITY_ROWS`` evenly spaced rows (not every row:
        it tells data sets apart, it does not check their integrity), and a description."""
        n, d = self._acts.shape
        rows = self._acts[torch.linspace(0, n - 1, min(n, IDENTITY_ROWS)).long()].contiguous()
        digest = hashlib.sha256(f"{n},{d},{self._acts.dtype}".encode())
        digest.update(rows.reshape(-1).view(torch.uint8).numpy().data)
        return {"fingerprint": digest.hexdigest(), "description": f"{n:,} x {d} activations ({self._acts.dtype})"}


def _refuse_token_ids(token_ids: bool) -> None:
    if token_ids:
        raise ValueError("activations from a tensor or file store no token ids; use an activation cache built by "
                         "`switchsae cache`")


#: rows a tensor source's fingerprint reads
IDENTITY_ROWS = 4096


def source_identity(source: object) -> dict[str, str] | None:
    """``{"fingerprint", "description"}`` of the activations ``source`` holds, or None for a source
    that cannot say (a plain iterable of batches)."""
    identity = getattr(source, "identity", None)
    return identity() if callable(identity) else None


def load_tensor_file(path: Path) -> Tensor:
    """Read a ``[tokens, d_model]`` matrix from ``.safetensors`` (key ``activations``) or ``.npy``."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{path} is not a readable safetensors file: {err}") from None
        if "activations" not in tensors:
            raise ValueError(f"{path} has no tensor named 'activations' (found: {sorted(tensors)})")
        return tensors["activations"]
    if path.suffix == ".npy":
        try:
            return torch.from_numpy(np.load(path, allow_pickle=False, mmap_mode="r").copy())
        except ValueError as err:
            raise ValueError(f"{path} is not a readable .npy array: {err}") from None
    raise ValueError(f"{path}: expected a .safetensors or .npy file, or an activation cache folder")


def open_activations(path: str | Path) -> ActivationSource:
    """Open a ``.safetensors``/``.npy`` file or an activation-cache folder as a source."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"activations not found: {path}")
    if path.is_dir():
        from switchsae.sources.cache import ActivationCache
        return ActivationCache(path)
    return TensorSource(load_tensor_file(path))
