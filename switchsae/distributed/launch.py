"""Starting a distributed run: the process group from torchrun's environment, and ``--nproc``.

``torchrun --nproc-per-node P -m switchsae train ...`` starts ``P`` processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and a rendezvous in their environment; each calls
:func:`world_for`, which joins the process group (gloo on CPU, NCCL on CUDA, one GPU per local
rank) with the collective timeout of ``--dist-timeout`` and builds the mesh. ``switchsae train
--nproc P ...`` is the same command through torchrun's own launcher (:func:`relaunch`), with
each process given ``cores / P`` threads, and its exit status that of the first rank to fail.
"""
from __future__ import annotations

import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from switchsae.config import ParallelConfig
from switchsae.distributed.mesh import Mesh
from switchsae.distributed.world import SINGLE, World


def launched_by_torchrun() -> bool:
    """Whether this process is one rank of a run torchrun (or an equivalent launcher) started."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def world_for(parallel: ParallelConfig, device: str) -> World:
    """This process's :class:`World`: the one process alone, or its rank of a torchrun launch."""
    if launched_by_torchrun():
        if parallel.nproc > 1:
            raise ValueError("--nproc starts torchrun itself; under torchrun leave it out (the world size is "
                             "torchrun's --nproc-per-node)")
        return connect(parallel, device)
    if parallel.expert_parallel > 1:
        raise ValueError(f"--expert-parallel {parallel.expert_parallel} needs at least {parallel.expert_parallel} "
                         "processes: add --nproc N or start the command with torchrun")
    return SINGLE


def connect(parallel: ParallelConfig, device: str, init_method: str = "env://", rank: int | None = None,
            world_size: int | None = None) -> World:
    """Join the process group (``init_method``: torchrun's environment by default, or e.g. a
    ``file://`` rendezvous with ``rank`` and ``world_size``) and build the mesh."""
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, init_method=init_method, rank=-1 if rank is None else rank,
                            world_size=-1 if world_size is None else world_size,
                            timeout=timedelta(seconds=parallel.dist_timeout))
    try:
        return World(Mesh.create(parallel.expert_parallel), parallel.expert_capacity)
    except ValueError as err:  # the same on every rank: rank 0 says it
        setattr(err, "reported_elsewhere", dist.get_rank() != 0)  # noqa: B010 - read by the CLI with getattr
        raise


def disconnect() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def relaunch(nproc: int, argv: list[str]) -> int:
    """Run ``python -m switchsae <argv>`` as ``nproc`` processes through torchrun's launcher
    (standalone rendezvous on this machine); returns the exit status: 0, or that of the first
    rank that failed (whose own one-line message is already printed)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # the ranks say what went wrong
    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0",
                                         "--module", "switchsae", *argv])
    try:
        run(args)
    except ChildFailedError as err:
        return err.get_first_failure()[1].exitcode or 1
    return 0


def without_nproc(argv: list[str]) -> list[str]:
    """``argv`` without its ``--nproc N`` / ``--nproc=N`` (for the command each rank runs)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out
