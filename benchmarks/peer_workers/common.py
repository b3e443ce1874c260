"""What every peer worker shares: reading the batches, timing the loop, metrics, the JSON line.

Imports only numpy and torch, so that it loads in every peer's virtual environment. A worker
is run as a script (``python NAME_worker.py --train T.npy --eval E.npy ...``) by
``benchmarks/peers.py``; this folder is then ``sys.path[0]`` and ``import common`` works.

Protocol: batch ``i`` of the training loop is rows ``[i*B, (i+1)*B)`` of ``--train``; the
metrics are computed on every row of ``--eval``; the worker prints exactly one line starting
with :data:`RESULT_PREFIX` followed by a JSON object (see :func:`report`).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import time
from importlib.metadata import version
from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

RESULT_PREFIX = "PEER_RESULT "

# A reconstruction callback: x -> (x_hat, code). ``code`` is either a dense [T, M] latent
# matrix or a (values [T, k], indices [T, k]) pair; zeros count as inactive.
Reconstruct = Callable[[Tensor], "tuple[Tensor, Tensor | tuple[Tensor, Tensor]]"]


def worker_parser(description: str) -> argparse.ArgumentParser:
    """The options every worker takes; a worker may add its own before parsing."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--train", required=True, help=".npy of steps*batch_size training rows, in batch order")
    parser.add_argument("--eval", required=True, help=".npy of held-out rows")
    parser.add_argument("--other", default=None, help=".npy of held-out rows of another domain (optional)")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--width", type=int, required=True)
    parser.add_argument("--k", type=int, required=True)
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    return parser


def setup(args: argparse.Namespace) -> None:
    """Same thread count and seed in every worker."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)


def _npy_layout(path: str) -> tuple[int, tuple[int, ...], np.dtype]:
    """Byte offset of the data, shape and dtype of a C-ordered ``.npy`` file (nothing is read)."""
    mapped = np.load(path, mmap_mode="r")
    if not mapped.flags.c_contiguous:
        raise ValueError(f"{path} is not C-ordered")
    layout = (mapped.offset, mapped.shape, mapped.dtype)
    del mapped
    return layout


class TrainBatches:
    """Re-iterable stream of the training batches, read from disk one batch at a time.

    Batches are read with plain file reads rather than through a memory map: pages of a
    mapped file count in the process's RSS, which would add the whole training set to every
    peer's peak RSS. The file sits in the page cache after the harness writes it, so a read
    costs about a millisecond per batch, the same for every worker.

    Timing: every iteration records when batch ``warmup`` is requested (``started``) and
    :meth:`stop` records the end; ``seconds`` is the difference. A worker whose training
    function iterates the stream more than once (ours: once for the init sample, once for
    the loop) is timed over its last iteration.
    """

    def __init__(self, path: str, batch_size: int, steps: int, warmup: int):
        self.path, self.batch_size, self.steps, self.warmup = path, batch_size, steps, warmup
        self.offset, shape, dtype = _npy_layout(path)
        if dtype != np.float32 or len(shape) != 2:
            raise ValueError(f"{path}: expected a 2-D float32 array, got {dtype} {shape}")
        if shape[0] < steps * batch_size:
            raise ValueError(f"{path} holds {shape[0]} rows; {steps} steps of {batch_size} need {steps * batch_size}")
        if not 0 <= warmup < steps:
            raise ValueError(f"warmup must lie in [0, steps), got {warmup}")
        self.d_model = shape[1]
        self.started: float | None = None
        self.stopped: float | None = None

    def batch(self, i: int) -> Tensor:
        """Rows ``[i*B, (i+1)*B)`` as a float32 tensor."""
        count = self.batch_size * self.d_model
        with open(self.path, "rb") as f:
            f.seek(self.offset + i * count * 4)
            data = np.fromfile(f, dtype=np.float32, count=count)
        return torch.from_numpy(data.reshape(self.batch_size, self.d_model))

    def __iter__(self) -> Iterator[Tensor]:
        self.started = None
        for i in range(self.steps):
            if i == self.warmup:
                self.started = time.perf_counter()
            yield self.batch(i)

    def __len__(self) -> int:
        return self.steps

    def stop(self) -> None:
        """Mark the end of the training loop."""
        self.stopped = time.perf_counter()

    @property
    def seconds(self) -> float:
        if self.started is None or self.stopped is None:
            raise RuntimeError("the training loop was not run through to the end before stop()")
        return self.stopped - self.started

    @property
    def tokens_per_s(self) -> float:
        return (self.steps - self.warmup) * self.batch_size / self.seconds


def load_eval(path: str) -> Tensor:
    """The held-out rows, fully in memory (they are small)."""
    return torch.from_numpy(np.load(path).astype(np.float32, copy=False))


@torch.no_grad()
def metrics(reconstruct: Reconstruct, rows: Tensor, width: int, batch_size: int) -> dict[str, float]:
    """FVU, L0 and dead fraction over ``rows`` (the definitions of ``switchsae.evaluate``).

    FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖² with x̄ the mean of all rows; L0 = mean non-zero latents per
    row; dead fraction = latents that are non-zero on no row.
    """
    sq_err, l0 = 0.0, 0.0
    fired = torch.zeros(width, dtype=torch.bool)
    x_all = rows.double()
    total_var = (x_all - x_all.mean(0)).pow(2).sum().item()
    for start in range(0, rows.shape[0], batch_size):
        x = rows[start:start + batch_size]
        x_hat, code = reconstruct(x)
        sq_err += (x.double() - x_hat.double()).pow(2).sum().item()
        if isinstance(code, tuple):
            values, indices = code
            active = values != 0
            fired[indices[active]] = True
        else:
            active = code != 0
            fired |= active.any(0)
        l0 += active.sum().item()
    return {"fvu": sq_err / max(total_var, 1e-30), "l0": l0 / rows.shape[0], "dead_frac": 1.0 - fired.float().mean().item()}


def peak_rss_gb() -> float:
    """Peak resident set size of this process in GiB.

    Read from ``VmHWM`` in ``/proc/self/status``, which starts afresh at ``exec``. ``ru_maxrss``
    does not: a worker forked from the harness would report the harness's own peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def report(name: str, version: str, batches: TrainBatches, scores: dict[str, float], notes: str = "", **extra) -> None:
    """Print the one result line the harness reads."""
    result = {
        "peer": name,
        "version": version,
        "tokens_per_s": batches.tokens_per_s,
        "train_s": batches.seconds,
        "timed_steps": batches.steps - batches.warmup,
        "peak_rss_gb": peak_rss_gb(),
        **scores,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "notes": notes,
        **extra,
    }
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def encode_decode(model) -> Reconstruct:
    """The reconstruction of a peer SAE with ``encode(x) -> code`` and ``decode(code) -> x_hat``
    (SAELens, dictionary_learning), returning ``(x_hat, dense code)``."""
    def reconstruct(x: Tensor):
        code = model.encode(x)
        return model.decode(code), code
    return reconstruct


def score_and_report(name: str, package: str, reconstruct: Reconstruct, args: argparse.Namespace,
                     batches: TrainBatches, notes: str) -> None:
    """Score a peer on the held-out rows and print its result line (the end of every peer worker)."""
    report(name, version(package), batches, held_out_scores(reconstruct, args), notes)


def held_out_scores(reconstruct: Reconstruct, args: argparse.Namespace) -> dict[str, float]:
    """:func:`metrics` on the held-out rows, and with ``--other`` the same on the other domain's
    rows, suffixed ``_other``."""
    scores = metrics(reconstruct, load_eval(args.eval), args.width, args.batch_size)
    if args.other:
        other = metrics(reconstruct, load_eval(args.other), args.width, args.batch_size)
        scores.update({f"{key}_other": value for key, value in other.items()})
    return scores


def run_loop(step: Callable[[int, Tensor], None], batches: TrainBatches) -> None:
    """Drive a peer's per-step update over every batch in order, then stop the clock."""
    for i, x in enumerate(batches):
        step(i, x)
    batches.stop()
