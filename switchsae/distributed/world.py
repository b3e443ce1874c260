"""What the trainer needs to know about the other processes of a run: one :class:`World`.

The trainer (switchsae/train.py) calls the same methods whether it runs alone or on a mesh of
``P`` ranks (mesh.py); alone (:data:`SINGLE`) each is the identity, so the one-process path is
the one it always was. On a mesh:

- **start**: the ranks check that they were started with the same settings (a gather of every
  rank's settings, so a mismatch is an error naming the ranks and fields, not a hang); every step
  that can fail on one rank alone (claiming the run folder, reading a checkpoint, initialising)
  runs under :meth:`World.agreed`, so all ranks stop together with the same message; rank 0
  initialises the SAE (on the one-process first batch: the normalisation constant and the
  geometric-median biases) and broadcasts its config and weights; a Switch SAE then keeps only
  its rank's experts (expert_parallel.py).
- **each step**: the rank's shard of the batch (data_parallel.py); the loss terms the divergence
  guard and the log see are averaged over the ranks; gradients are averaged after the backward.
  Batch statistics inside the SAE (dead latents, load fractions, BatchTopK) reduce over
  ``sae.batch_group``.
- **checkpoints**: rank 0 writes one portable file; expert rows are gathered into it
  (:meth:`full`) and cut out again on resume (:meth:`local`), at any world size.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar, cast

import torch
from torch import Tensor

from switchsae.checkpoint import Layout
from switchsae.distributed.data_parallel import average_gradients, average_row_ranges, shard_batches
from switchsae.distributed.expert_parallel import EXPERT_PARAMS, ExpertParallel, check_expert_parallel, shard_experts
from switchsae.distributed.group import LOCAL, DistributedError, Group
from switchsae.distributed.mesh import SINGLE_MESH, Mesh
from switchsae.optim import squared_norm
from switchsae.run_folder import RunClaim, claim_run_dir
from switchsae.saes import SparseAutoencoder, build_sae

T = TypeVar("T")


class World(Layout):
    """This process's place in a run: its :class:`Mesh`, and for Switch SAEs split across ranks
    the capacity factor of the exchange (0: no token dropped)."""

    def __init__(self, mesh: Mesh = SINGLE_MESH, expert_capacity: float = 0.0):
        self.mesh, self.expert_capacity = mesh, expert_capacity
        self.experts: ExpertParallel | None = None
        self.writes = mesh.world.rank == 0

    @property
    def size(self) -> int:
        return self.mesh.world.size

    # -- start ------------------------------------------------------------------------------
    def check_start(self, settings: dict[str, Any], sae_cfg, batch_size: int) -> None:
        """Every rank has the same ``settings`` (flat or nested dicts of plain values), the batch
        splits evenly, and a Switch SAE's experts split across the expert-parallel ranks."""
        if self.size == 1:
            return
        first, *others = [_flat(s) for s in self.mesh.world.gather_objects(settings)]
        differ = [f"rank {rank} differs from rank 0 in {_differing(s, first)}"
                  for rank, s in enumerate(others, start=1) if s != first]
        try:
            if differ:
                raise ValueError("the ranks were started with different settings: " + "; ".join(differ))
            if batch_size % self.size:
                raise ValueError(f"--batch-size {batch_size} does not split evenly across the {self.size} ranks")
            if self.mesh.expert_parallel:
                check_expert_parallel(sae_cfg, self.mesh.ep.size)
        except ValueError as err:  # the same on every rank: they all stop, rank 0 says why
            self._everywhere(err)

    def agreed(self, fn: Callable[[], T]) -> T:
        """``fn()`` on every rank; if it fails on any, every rank raises (rank 0 names the failing
        rank and its message; a rank that failed raises its own error)."""
        try:
            result, error = fn(), None
        except Exception as err:  # noqa: BLE001 - handed to the other ranks, then raised here
            result, error = None, err
        if self.size == 1:
            if error is not None:
                raise error
            return cast(T, result)
        reports = self.mesh.world.gather_objects(None if error is None else f"{type(error).__name__}: {error}")
        failed = [(rank, report) for rank, report in enumerate(reports) if report is not None]
        if failed:
            self._everywhere(error or DistributedError("; ".join(f"rank {rank} failed: {report}"
                                                                 for rank, report in failed)))
        return cast(T, result)

    def _everywhere(self, error: Exception) -> None:
        """Raise ``error`` on this rank; only rank 0 reports it (the CLI prints it once)."""
        if not self.writes:
            setattr(error, "reported_elsewhere", True)  # noqa: B010 - read by the CLI with getattr
        raise error

    def decided(self, fn: Callable[[], T]) -> T:
        """``fn()`` run by rank 0 alone (agreed), its picklable result on every rank."""
        result = self.agreed(fn if self.writes else lambda: None)
        return cast(T, result if self.size == 1 else self.mesh.world.gather_objects(result)[0])

    def initialised(self, init: Callable[[], SparseAutoencoder]) -> SparseAutoencoder:
        """The SAE rank 0 initialises with ``init()``; the others build one of its config, and
        :meth:`prepare` gives them its weights."""
        made: list[SparseAutoencoder] = []

        def on_rank_0():
            made.append(init())
            return made[0].cfg

        cfg = self.decided(on_rank_0)
        return made[0] if made else build_sae(cfg)

    @contextmanager
    def claim(self, run_dir: Path | None, outputs: tuple[str, ...], checkpoint: str, resume: bool,
              force: bool) -> Iterator[RunClaim]:
        """Rank 0 claims the run folder (switchsae.run_folder); the others follow its checkpoints."""
        with ExitStack() as stack:
            yield self.agreed(lambda: stack.enter_context(claim_run_dir(run_dir, outputs, checkpoint, resume, force))
                              if self.writes else RunClaim(run_dir, checkpoint))

    def prepare(self, sae: SparseAutoencoder, broadcast: bool) -> None:
        """Attach ``sae`` to the mesh: batch statistics over every rank, rank 0's weights (with
        ``broadcast``: a fresh init), and a Switch SAE's experts split across the ep group."""
        if self.size == 1:
            return
        sae.batch_group = self.mesh.world
        if broadcast:
            with torch.no_grad():
                for tensor in [*sae.parameters(), *sae.buffers()]:
                    self.mesh.world.broadcast(tensor.data)
        if self.mesh.expert_parallel:
            self.experts = shard_experts(sae, self.mesh.ep, self.expert_capacity)

    # -- each step --------------------------------------------------------------------------
    def batches(self, stream: Iterable) -> Iterator:
        """This rank's shard of every batch of ``stream``."""
        return iter(stream) if self.size == 1 else shard_batches(stream, self.mesh.world.rank, self.size)

    def mean(self, terms: dict[str, Tensor]) -> dict[str, Tensor]:
        """The loss terms averaged over the ranks (detached): the whole batch's terms."""
        if self.size == 1:
            return terms
        stacked = self.mesh.world.sum(torch.stack([value.detach().float() for value in terms.values()])) / self.size
        return dict(zip(terms, stacked))

    def mean_values(self, values: dict[str, float]) -> dict[str, float]:
        """Per-rank batch statistics (means over a rank's tokens) averaged over the ranks."""
        if self.size == 1 or not values:
            return values
        means = self.mean({name: torch.tensor(value) for name, value in values.items()})
        return {name: value.item() for name, value in means.items()}

    def total(self, values: Tensor) -> Tensor:
        """``Σ_ranks values`` (a copy)."""
        return self.mesh.world.sum(values.clone())

    def reduce_gradients(self, sae: SparseAutoencoder) -> None:
        """Average the gradients of the whole batch: replicated parameters (and the shared expert's
        rows) over every rank, expert shards over their data-parallel column, each sum divided by
        the world size."""
        if self.size == 1:
            return
        replicated, split = self._replicated_and_split(sae)
        average_gradients(replicated, self.mesh.world, self.size)
        for p in split:
            average_row_ranges(p, self._expert_rows(), self.size)

    def gradient_norm(self, sae: SparseAutoencoder) -> Tensor:
        """``‖g‖`` of the whole SAE's (reduced) gradient, every parameter counted once: replicated
        parameters and the shared expert's rows from this rank, the routed expert rows summed over
        the ep group (each of its ranks holds other experts)."""
        replicated, split = self._replicated_and_split(sae)
        here, routed = torch.zeros((), device=sae.W_dec.device), torch.zeros((), device=sae.W_dec.device)
        for p in replicated:
            if p.grad is not None:
                here += squared_norm(p.grad)
        for grad in (p.grad for p in split if p.grad is not None):
            for rows, group in self._expert_rows():
                (routed if group is self.mesh.dp else here).add_(squared_norm(grad, rows))
        if split:
            self.mesh.ep.sum(routed)
        return (here + routed).sqrt()

    def _replicated_and_split(self, sae: SparseAutoencoder) -> tuple[list[Tensor], list[Tensor]]:
        """The parameters every rank holds whole, and the expert matrices split across the ep group
        (none without expert parallelism)."""
        split = set(EXPERT_PARAMS) if self.experts is not None else set()
        named = list(sae.named_parameters())
        return [p for name, p in named if name not in split], [p for name, p in named if name in split]

    def _expert_rows(self) -> list[tuple[slice, Group]]:
        """Which ranks share each range of the expert rows held here (:meth:`ExpertParallel.row_groups`)."""
        assert self.experts is not None  # only split parameters have expert rows
        return self.experts.row_groups(self.mesh.dp, self.mesh.world)

    def parallel_stats(self) -> dict[str, float]:
        """``dropped``: the fraction of the batch's routed entries (its tokens, with one entry per
        token) the expert capacity dropped (when set)."""
        if self.experts is None or not self.expert_capacity:
            return {}
        dropped, offered = self.total(torch.tensor([float(self.experts.dropped), float(self.experts.offered)])).tolist()
        return {"dropped": dropped / max(offered, 1.0)}

    # -- checkpoints ------------------------------------------------------------------------
    def full(self, name: str, tensor: Tensor) -> Tensor:
        return tensor if self.experts is None else self.experts.full(name, tensor)

    def local(self, name: str, tensor: Tensor) -> Tensor:
        return tensor if self.experts is None else self.experts.local(name, tensor)

    def finished(self, sae: SparseAutoencoder) -> SparseAutoencoder:
        """``sae`` as one process uses it after training: detached from the mesh, experts gathered
        (on every rank)."""
        sae.batch_group = LOCAL
        if self.experts is None:
            return sae
        whole = build_sae(sae.cfg).to(sae.W_dec.device)
        whole.load_state_dict({name: self.full(name, tensor) for name, tensor in sae.state_dict().items()})
        whole.matmul_dtype, whole.sparse_grads = sae.matmul_dtype, sae.sparse_grads
        return whole


def _differing(settings: dict[str, Any], reference: dict[str, Any]) -> list[str]:
    """The keys whose values differ between two flat settings dicts (present in one only included)."""
    return sorted(key for key in settings.keys() | reference.keys() if settings.get(key) != reference.get(key))


def _flat(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one dict with dotted keys."""
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


#: the world of one process
SINGLE = World()
