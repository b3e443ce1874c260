"""Training on several processes with torch.distributed: data parallel for every architecture,
expert parallel for Switch SAEs, on a 2-D mesh (dp × ep).

- group.py: :class:`~switchsae.distributed.group.Group`, the collectives (identity alone)
- mesh.py: the dp × ep mesh of ranks
- data_parallel.py: batch shards, gradient averaging (dense buckets and row-sparse)
- expert_parallel.py: experts split across ranks (the shared one replicated), the paths of a forward
- exchange.py: the all-to-all of entry rows to their owners and back (autograd included)
- union.py: several entries per token: the TopK over a token's experts at its home, AuxK
- world.py: :class:`~switchsae.distributed.world.World`, what the trainer calls
- launch.py: the process group from torchrun, ``--nproc``

This package is imported by the SAEs (group.py only), so it imports nothing at package level.
"""
