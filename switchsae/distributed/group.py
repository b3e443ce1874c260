"""A set of ranks that combine values, over ``torch.distributed``; the group of one process is the identity.

Every collective the library runs goes through a :class:`Group`, so code written against one runs
unchanged alone (:data:`LOCAL` returns every value as it is, without touching
``torch.distributed``) and a lost peer surfaces as one :class:`DistributedError` naming the
operation, not as a bare backend error. Collectives block until every rank of the group calls
them in the same order, and fail after the process group's timeout when one never does.
"""
from __future__ import annotations

import math
import re
import weakref
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor


class DistributedError(RuntimeError):
    """A rank stopped, or did not answer within the process group's timeout, or the ranks disagree."""

    #: set on an error a rank raises because another rank reported it (that rank prints it)
    reported_elsewhere: bool = False


class Group:
    """The ranks of ``process_group`` (None: the single process). ``rank``/``size`` within it;
    ``device`` is where its control tensors live (CPU for gloo, the current GPU for NCCL).

    The process group is held weakly: torch owns it until ``destroy_process_group``, which then
    frees it. (A process group still referenced when the interpreter exits is torn down after
    its backend's threads, which aborts the process.)
    """

    def __init__(self, process_group: dist.ProcessGroup | None = None):
        self._process_group = None if process_group is None else weakref.ref(process_group)
        self.size = 1 if process_group is None else dist.get_world_size(process_group)
        self.rank = 0 if process_group is None else dist.get_rank(process_group)
        nccl = process_group is not None and dist.get_backend(process_group) == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    @property
    def process_group(self) -> dist.ProcessGroup | None:
        if self._process_group is None:
            return None
        process_group = self._process_group()
        if process_group is None:
            raise DistributedError("this process has left the process group (switchsae.distributed.launch.disconnect)")
        return process_group

    def _run(self, name: str, collective: Callable[[], Any]) -> Any:
        try:
            return collective()
        except (RuntimeError, dist.DistError) as err:
            if isinstance(err, DistributedError):
                raise
            cause = re.sub(r"^\[[^\]]*\]\s*", "", (str(err).strip().splitlines() or [type(err).__name__])[0])
            raise DistributedError(f"rank {dist.get_rank()} lost contact with the other ranks in {name} (a rank "
                                   f"stopped, or did not answer within the process-group timeout): {cause}") from None

    # -- reductions (in place; the tensor is returned) -------------------------------------
    def sum(self, tensor: Tensor) -> Tensor:
        """``Σ_ranks tensor``, in place."""
        return self._reduce(tensor, dist.ReduceOp.SUM, "sum")

    def max(self, tensor: Tensor) -> Tensor:
        """Elementwise maximum over the ranks, in place."""
        return self._reduce(tensor, dist.ReduceOp.MAX, "max")

    def min(self, tensor: Tensor) -> Tensor:
        """Elementwise minimum over the ranks, in place."""
        return self._reduce(tensor, dist.ReduceOp.MIN, "min")

    def any(self, mask: Tensor) -> Tensor:
        """Elementwise OR of a bool mask over the ranks (one byte per element on the wire)."""
        if self.size == 1:
            return mask
        return self.max(mask.to(torch.uint8)).bool()

    def _reduce(self, tensor: Tensor, op: dist.ReduceOp.RedOpType, name: str) -> Tensor:
        if self.size > 1:
            self._run(f"an all-reduce ({name})", lambda: dist.all_reduce(tensor, op=op, group=self.process_group))
        return tensor

    def sum_counts(self, counts: list[int]) -> list[int]:
        """``Σ_ranks counts`` of host integers (e.g. tokens per expert)."""
        if self.size == 1:
            return counts
        return self.sum(torch.tensor(counts, dtype=torch.long, device=self.device)).tolist()

    # -- gathers ---------------------------------------------------------------------------
    def gather(self, tensor: Tensor) -> Tensor:
        """Every rank's ``tensor`` (same shape on all) concatenated along dim 0, in rank order."""
        if self.size == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        self._run("an all-gather", lambda: dist.all_gather(parts, tensor.contiguous(), group=self.process_group))
        return torch.cat(parts)

    def gather_rows(self, tensor: Tensor) -> Tensor:
        """Every rank's ``tensor`` concatenated along dim 0, the number of rows free to differ."""
        if self.size == 1:
            return tensor
        sizes = self.gather(torch.tensor([tensor.shape[0]], device=self.device)).tolist()
        padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
        padded[:tensor.shape[0]] = tensor
        parts = self.gather(padded).split(max(sizes))
        return torch.cat([part[:n] for part, n in zip(parts, sizes)])

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's picklable ``obj``, in rank order."""
        if self.size == 1:
            return [obj]
        out: list[Any] = [None] * self.size
        self._run("an all-gather of objects", lambda: dist.all_gather_object(out, obj, group=self.process_group))
        return out

    def broadcast(self, tensor: Tensor, src: int = 0) -> Tensor:
        """``tensor`` of the group's rank ``src`` on every rank, in place."""
        if self.size > 1:
            assert self.process_group is not None  # a group of several ranks has one
            root = dist.get_global_rank(self.process_group, src)
            self._run("a broadcast", lambda: dist.broadcast(tensor, root, group=self.process_group))
        return tensor

    def kth_largest(self, values: Tensor, k: int) -> Tensor:
        """The ``k``-th largest of all ranks' ``values`` together, along the last dimension (each
        rank passes its own ``[..., n]``; the result is ``[...]``, the same on every rank).

        Each rank's share of the top ``k`` is among its own ``k`` largest, so every rank sends at most
        ``k`` candidates per row (padded with -inf to exactly ``k``): ``size · k`` values per row.
        """
        local = values.topk(min(k, values.shape[-1]), dim=-1, sorted=False).values
        candidates = torch.full((*values.shape[:-1], k), -math.inf, dtype=values.dtype, device=values.device)
        candidates[..., :local.shape[-1]] = local
        every = self.gather(candidates[None])  # [size, ..., k]
        return every.movedim(0, -2).flatten(-2).topk(k, dim=-1, sorted=False).values.min(-1).values

    def logsumexp(self, values: Tensor) -> Tensor:
        """``log Σ exp`` over dim 0 of every rank's rows together, ``[1, ...]`` (stable: shifted by the
        ranks' maximum)."""
        if self.size == 1:
            return torch.logsumexp(values, dim=0, keepdim=True)
        shift = self.max(values.max(0, keepdim=True).values)
        return shift + self.sum((values - shift).exp().sum(0, keepdim=True)).log()

    def all_to_all(self, rows: Tensor, send: list[int], recv: list[int]) -> Tensor:
        """Rows ``rows.split(send)[r]`` go to rank ``r``; returns the rows received, grouped by the
        rank they came from (``recv[r]`` of them). Splits may be uneven or zero."""
        if self.size == 1:
            return rows
        out = rows.new_empty((sum(recv), *rows.shape[1:]))
        self._run("an all-to-all", lambda: dist.all_to_all_single(out, rows.contiguous(), recv, send,
                                                                  group=self.process_group))
        return out

    def barrier(self) -> None:
        if self.size > 1:
            self._run("a barrier", lambda: dist.barrier(group=self.process_group))


#: the group of one process: every collective is the identity
LOCAL = Group()
