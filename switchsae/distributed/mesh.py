"""The 2-D mesh of training processes: data parallel (dp) × expert parallel (ep).

``world = dp · ep`` ranks. Global rank ``g = i·ep + j`` has data-parallel index ``i`` and
expert-parallel index ``j``: the ``ep`` consecutive ranks of one row split the experts between
them (on one machine, so the all-to-all stays on the fast links), and the ``dp`` ranks of one
column hold the same experts. Every rank reads its own shard of every batch, so the batch is
split ``world`` ways whatever the layout; with ``ep = 1`` this is plain data parallelism.

    batch group (all ranks):   batch statistics, replicated parameters' gradients
    ep group (one row):        the all-to-all of tokens to their experts, checkpoint gathers
    dp group (one column):     expert parameters' gradients
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from switchsae.distributed.group import LOCAL, Group


@dataclass(frozen=True)
class Mesh:
    """The three groups one rank belongs to (see the module docstring)."""

    world: Group
    dp: Group
    ep: Group

    @classmethod
    def create(cls, expert_parallel: int = 1) -> "Mesh":
        """Split the initialised default process group into ``world / expert_parallel`` rows of
        ``expert_parallel`` ranks. Every rank must call this with the same value (it creates every
        group, as ``torch.distributed.new_group`` requires)."""
        size = dist.get_world_size()
        if expert_parallel < 1 or size % expert_parallel:
            raise ValueError(f"the expert-parallel size {expert_parallel} does not divide the {size} processes")
        dp_size, rank = size // expert_parallel, dist.get_rank()
        rows = [list(range(i * expert_parallel, (i + 1) * expert_parallel)) for i in range(dp_size)]
        columns = [list(range(j, size, expert_parallel)) for j in range(expert_parallel)]
        ep = _member_of(rows, rank)
        dp = _member_of(columns, rank)
        return cls(Group(dist.group.WORLD), dp, ep)

    @property
    def expert_parallel(self) -> bool:
        return self.ep.size > 1


def _member_of(partition: list[list[int]], rank: int) -> Group:
    """Create one group per part (collectively) and return the one holding ``rank``; a part of one
    rank is :data:`LOCAL`."""
    mine = LOCAL
    for ranks in partition:
        group = dist.new_group(ranks) if len(ranks) > 1 else None
        if rank in ranks and group is not None:
            mine = Group(group)
    return mine


#: the mesh of one process
SINGLE_MESH = Mesh(LOCAL, LOCAL, LOCAL)
