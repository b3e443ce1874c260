"""Run a test module's checks on worker processes (gloo, one thread each), once per module.

A test module defines ``rank_*`` functions taking a :class:`Ranks`; :func:`run_on_ranks` starts
the workers (a spawn costs seconds, mostly importing torch, so one per module), which join a
file-based rendezvous, run every such function in definition order and save what each returns
(or its traceback). The module's tests then compare those results with the one-process
computation. A check must make the same collective calls on every rank; after a check fails on
any rank the workers stop (their collectives would no longer line up).

Run as a script, this file is the worker: ``spawn_ranks.py MODULE RANK SIZE SHARED TIMEOUT``.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def assert_same_logs(run_dir: Path, expected_dir: Path, ignore: tuple[str, ...] = ("elapsed_s",)) -> None:
    """Two runs logged the same steps with the same losses, FVU, L0 and dead fractions (the keys
    ``ignore`` aside: wall time, and what only one of the two runs logs)."""
    def log(folder: Path) -> list[dict]:
        lines = (folder / "log.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k not in ignore} for line in lines]

    got, expected = log(run_dir), log(expected_dir)
    assert len(got) == len(expected)
    for entry, reference in zip(got, expected):
        assert entry == pytest.approx(reference, rel=1e-4, abs=1e-6), f"step {reference['step']}"


def weights_atol(cfg: Any) -> float:
    """Absolute tolerance of weights trained on ranks against one process's, for TrainConfig ``cfg``: fp32
    Adam moments agree to rounding; with bf16 moments a gradient a few ulps off can still flip a
    stochastic rounding, one bf16 ulp (2^-7) of a moment, so up to lr * 2^-7 per step."""
    return 1e-5 if cfg.adam_moments == "fp32" else cfg.steps * (cfg.lr or 0) * 2**-7


@dataclass
class Ranks:
    """What a check sees in a worker: its rank, the world size, a folder every rank and the test share."""

    rank: int
    size: int
    shared: Path

    def world(self, expert_parallel: int = 1, expert_capacity: float = 0.0):
        """A fresh :class:`~switchsae.distributed.world.World` on a mesh of every worker."""
        from switchsae.distributed.mesh import Mesh
        from switchsae.distributed.world import World

        return World(Mesh.create(expert_parallel), expert_capacity)

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()


class Results:
    """The results of a module's checks: ``results(name)`` is the list of what each rank returned."""

    def __init__(self, shared: Path, size: int):
        self.shared, self.size = shared, size
        self.by_rank = [_load(shared / f"results-{rank}.pt") for rank in range(size)]

    def __call__(self, name: str) -> list[Any]:
        values = []
        for rank, results in enumerate(self.by_rank):
            if name not in results:
                log = (self.shared / f"rank-{rank}.log").read_text()[-4000:]
                raise AssertionError(f"rank {rank} did not run {name}; its output ends:\n{log}")
            status, value = results[name]
            if status != "ok":
                raise AssertionError(f"{name} failed on rank {rank}:\n{value}")
            values.append(value)
        return values


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=False) if path.exists() else {}


def run_on_ranks(module_file: str, shared: Path, size: int = 2, timeout_s: float = 30.0,
                 budget_s: float = 900.0) -> Results:
    """Run the ``rank_*`` checks of ``module_file`` on ``size`` workers; ``timeout_s`` is their
    process group's collective timeout, ``budget_s`` the most the whole run may take."""
    shared.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    logs = [open(shared / f"rank-{rank}.log", "w") for rank in range(size)]
    workers = [subprocess.Popen([sys.executable, __file__, module_file, str(rank), str(size), str(shared),
                                 str(timeout_s)], env=env, stdout=log, stderr=subprocess.STDOUT)
               for rank, log in enumerate(logs)]
    deadline = time.monotonic() + budget_s
    try:
        for worker in workers:
            worker.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for worker in workers:
            worker.kill()
    finally:
        for log in logs:
            log.close()
    return Results(shared, size)


def _worker(module_file: str, rank: int, size: int, shared: Path, timeout_s: float) -> None:
    from switchsae.config import ParallelConfig
    from switchsae.distributed.launch import connect, disconnect

    torch.set_num_threads(1)
    world = connect(ParallelConfig(dist_timeout=timeout_s), "cpu", init_method=f"file://{shared}/rendezvous",
                    rank=rank, world_size=size)
    spec = importlib.util.spec_from_file_location(Path(module_file).stem, module_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ranks, results = Ranks(rank, size, shared), {}
    for name, check in [(n, f) for n, f in vars(module).items() if n.startswith("rank_") and callable(f)]:
        try:
            results[name] = ("ok", check(ranks))
        except BaseException:  # noqa: BLE001 - reported to the test
            results[name] = ("error", traceback.format_exc())
        torch.save(results, shared / f"results-{rank}.pt")
        try:
            statuses = world.mesh.world.gather_objects(results[name][0])
        except Exception:  # noqa: BLE001 - a peer is gone (a check may end that way)
            break
        if any(status != "ok" for status in statuses):
            break
    disconnect()


if __name__ == "__main__":
    _worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]), float(sys.argv[5]))
