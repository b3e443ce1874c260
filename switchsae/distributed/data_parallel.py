"""Data parallelism: each rank trains on its own shard of every batch; gradients are averaged.

**Shards.** The training batch of step ``i`` (``cfg.batch_size`` rows, a pure function of the seed
and ``i``, see sources/activations.py) is cut into ``P`` equal slices and rank ``r`` takes slice
``r``: a pure function of ``(seed, i, r)``. The union over ranks is the one-process batch, so a
run resumed at another world size continues the same stream. Each rank reads the whole batch and
keeps its slice (``B·d`` floats read per rank and step, ~0.1 GB at ``B = 8192``, ``d = 4096``:
far below the step's own memory traffic).

**Gradients.** Every rank's loss is a mean over its ``B/P`` tokens, so the gradient of the
one-process loss is the average of the ranks' gradients. With expert parallelism each rank's
loss ``ℓ_q`` is its share of ``L = (1/P) Σ_q ℓ_q`` (expert_parallel.py), and the gradient of a
parameter is ``(1/P) Σ`` over the ranks that hold it: all ranks for replicated parameters, the
data-parallel column for an expert shard. :func:`average_gradients` does exactly that after the
backward, with dense gradients flattened into buckets of ~``bucket_bytes`` (one all-reduce each)
and row-sparse ones (``--sparse-updates``) all-gathered as (row, value) pairs and summed, so the
result is row-sparse over the union of the rows any rank touched. torch's DDP is not used: it
does not take row-sparse gradients from a custom autograd function, and an SAE's backward is one
fused operation, so there is little backward to overlap the all-reduce with.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import torch
from torch import Tensor

from switchsae.distributed.group import Group

Batch = Tensor | tuple[Tensor, ...]

#: dense gradients are all-reduced in flat buckets of about this many bytes
BUCKET_BYTES = 25 * 2**20


def shard_batches(stream: Iterable[Batch], rank: int, size: int) -> Iterator[Batch]:
    """Slice ``rank`` of ``size`` equal slices of every batch (a batch may be an ``(x, ids)`` pair)."""
    for batch in stream:
        parts = batch if isinstance(batch, tuple) else (batch,)
        rows = parts[0].shape[0]
        if rows % size:
            raise ValueError(f"a batch of {rows} rows does not split into {size} equal shards")
        lo, hi = rank * rows // size, (rank + 1) * rows // size
        shard = tuple(part[lo:hi] for part in parts)
        yield shard if isinstance(batch, tuple) else shard[0]


def average_gradients(params: Iterable[Tensor], group: Group, divisor: int, bucket_bytes: int = BUCKET_BYTES) -> None:
    """``p.grad ← (Σ_group p.grad) / divisor`` for every parameter with a gradient, in place.

    Every rank must pass the same parameters in the same order, with gradients of the same
    layout (the same code computes them). Row-sparse gradients come back coalesced.
    """
    with_grad = [(p, p.grad) for p in params if p.grad is not None]
    if group.size == 1 and divisor == 1:
        return
    dense = [grad for _, grad in with_grad if not grad.is_sparse]
    for bucket in _buckets(dense, bucket_bytes):
        flat = group.sum(torch.cat([grad.reshape(-1) for grad in bucket])).div_(divisor)
        for grad, part in zip(bucket, flat.split([grad.numel() for grad in bucket])):
            grad.copy_(part.view_as(grad))
    for p, grad in with_grad:
        if grad.is_sparse:
            p.grad = sum_row_sparse(grad, group).div_(divisor)


def average_row_ranges(p: Tensor, ranges: list[tuple[slice, Group]], divisor: int) -> None:
    """``p.grad ← (Σ_group p.grad) / divisor`` with each range of rows summed over its own group
    (an expert shard holding replicated rows, the shared expert's); dense or row-sparse."""
    grad = p.grad
    if grad is None:
        return
    if not grad.is_sparse:
        for rows, group in ranges:
            group.sum(grad[rows])  # a range of rows of a contiguous gradient is contiguous: reduced in place
        grad.div_(divisor)
        return
    grad = grad.coalesce()
    ids, values = grad._indices()[0], grad._values()
    parts = []
    for rows, group in ranges:
        inside = (ids >= (rows.start or 0)) & (ids < (grad.shape[0] if rows.stop is None else rows.stop))
        part = torch.sparse_coo_tensor(ids[inside][None], values[inside], grad.shape)
        parts.append(sum_row_sparse(part, group))
    summed = torch.sparse_coo_tensor(torch.cat([q._indices() for q in parts], 1),
                                     torch.cat([q._values() for q in parts]), grad.shape)
    p.grad = summed.coalesce().div_(divisor)


def sum_row_sparse(grad: Tensor, group: Group) -> Tensor:
    """``Σ_group grad`` for row-sparse COO gradients: every rank's (row, value) pairs gathered,
    duplicates summed. On the wire: the touched rows of all ranks, ``Σ_r R_r · (d + 2)`` words."""
    grad = grad.coalesce()
    rows = group.gather_rows(grad._indices()[0])
    values = group.gather_rows(grad._values())
    return torch.sparse_coo_tensor(rows[None], values, grad.shape).coalesce()


def _buckets(grads: list[Tensor], bucket_bytes: int) -> Iterator[list[Tensor]]:
    """Consecutive gradients of one dtype and device, about ``bucket_bytes`` per bucket."""
    bucket: list[Tensor] = []
    size = 0
    for grad in grads:
        nbytes = grad.numel() * grad.element_size()
        if bucket and (size + nbytes > bucket_bytes or (grad.dtype, grad.device) != (bucket[0].dtype,
                                                                                      bucket[0].device)):
            yield bucket
            bucket, size = [], 0
        bucket.append(grad)
        size += nbytes
    if bucket:
        yield bucket
