"""Expert parallelism for Switch SAEs: experts split across ranks, tokens sent to their experts.

With ``P_e`` ranks in an expert-parallel group and ``B`` expert blocks, rank ``j`` holds blocks
``[j·B/P_e, (j+1)·B/P_e)``, i.e. rows ``[j·M/P_e, (j+1)·M/P_e)`` of ``W_enc`` and ``W_dec``; the
router (``W_r``, ``b_r``) and ``b_pre`` are replicated. Each rank routes its own tokens; then

1. the entries' per-block counts are exchanged (an all-to-all of ``P_e × B/P_e`` integers), so
   every rank knows how many rows it receives from each peer for each of its blocks;
2. each entry's input row and gate go to the rank owning its expert (:class:`RowExchange`, one
   ``all_to_all_single`` of ``d + 1`` floats per entry, uneven and empty splits allowed);
3. the owner regroups what it received by block and runs the same expert compute as one
   process (:meth:`SwitchSAE.expert_compute`: fused selection, sparse encode, decode and squared
   error), with latent ids local to its shard;
4. the reconstructions and codes go back (the reverse all-to-all: ``d + 3k`` words per entry)
   and are put in token order.

**The loss.** The squared error of a token is computed where its expert lives, so rank ``q``'s
``mse`` is ``S_q / T`` with ``S_q`` the squared error of the entries it *received* and ``T`` its
own batch: ``L = (1/P) Σ_q ℓ_q`` over all ``P`` ranks is the one-process loss of the whole batch,
and so is the mean of the logged terms. Gradients follow: the gate's gradient travels back
with the reverse exchange (:class:`RowExchange` is an autograd function), expert gradients stay
on the owner, and data_parallel.py divides every parameter's summed gradient by ``P``. A rank
that receives no entries still runs the expert compute on zero rows, so every rank calls every
backward all-to-all.

**Capacity.** By default no entry is dropped (uneven splits cost nothing but balance). With a
capacity factor ``c``, each rank sends at most ``⌈c·T/N⌉`` entries to each expert (the first in
token order); a dropped token is reconstructed by ``b_pre`` alone, its squared error counted on
its own rank, and the fraction dropped is logged (``dropped``).

Routers with at most one entry per token are supported (top1, hash, sinkhorn): a token routed to
several experts needs a TopK across ranks, which this module does not do.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from switchsae.config import SAEConfig
from switchsae.distributed.group import Group
from switchsae.kernels.dispatch import dispatch
from switchsae.saes.base import Latents
from switchsae.saes.routing import Assignment

#: the Switch SAE parameters split along the latent axis; all others are replicated
EXPERT_PARAMS = ("W_enc", "W_dec")
#: routers giving every token at most one entry
ONE_ENTRY_ROUTERS = ("top1", "hash", "sinkhorn")


def check_expert_parallel(cfg: SAEConfig, ranks: int) -> None:
    """Refuse, in one line, an SAE that cannot be split across ``ranks`` expert-parallel ranks."""
    if cfg.arch != "switch":
        raise ValueError(f"expert parallelism splits a Switch SAE's experts; --arch {cfg.arch} has none "
                         "(use data parallelism alone)")
    if cfg.n_blocks % ranks:
        raise ValueError(f"the {cfg.n_blocks} experts do not split evenly across {ranks} expert-parallel ranks "
                         f"(choose an --expert-parallel size that divides {cfg.n_blocks})")
    if cfg.routing.router not in ONE_ENTRY_ROUTERS or cfg.routing.shared_expert:
        raise ValueError(f"expert parallelism supports routers with one expert per token "
                         f"({', '.join(ONE_ENTRY_ROUTERS)}, no shared expert), not {cfg.routing.router}"
                         f"{' with a shared expert' if cfg.routing.shared_expert else ''}")
    if cfg.auxk_coeff:
        raise ValueError("AuxK (--auxk-coeff) is not supported with expert parallelism")


@dataclass(frozen=True)
class Route:
    """Who sends how many rows to whom: ``send[r]`` rows to rank ``r``, ``recv[r]`` from it."""

    group: Group
    send: list[int]
    recv: list[int]

    def reverse(self) -> "Route":
        return Route(self.group, self.recv, self.send)

    def exchange(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """Send row-aligned tensors (``[rows, ...]``, any dtypes) along the route in one message:
        each row's bytes are packed side by side, so one all-to-all carries them all."""
        rows = sum(self.send)
        flat = [t.reshape(rows, math.prod(t.shape[1:])).contiguous() for t in tensors]
        packed = torch.cat([t.view(torch.uint8) for t in flat], 1)
        received = self.group.all_to_all(packed, self.send, self.recv)
        parts = received.split([t.shape[1] * t.element_size() for t in flat], 1)
        return [part.contiguous().view(t.dtype).reshape(received.shape[0], *t.shape[1:])
                for part, t in zip(parts, tensors)]


class RowExchange(torch.autograd.Function):
    """:meth:`Route.exchange` as an autograd function: the backward sends the gradients of the
    floating-point inputs that need one back along the reverse route (one message)."""

    @staticmethod
    def forward(ctx, route: Route, *tensors: Tensor) -> tuple[Tensor, ...]:
        ctx.route = route
        out = route.exchange(tensors)
        ctx.mark_non_differentiable(*(t for t in out if not t.is_floating_point()))
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        needed = [i for i, need in enumerate(ctx.needs_input_grad[1:]) if need]
        back = iter(ctx.route.reverse().exchange([grads[i] for i in needed]) if needed else [])
        return (None, *(next(back) if i in needed else None for i in range(len(grads))))


class ExpertParallel:
    """The exchange around a Switch SAE's expert compute (see the module docstring); the SAE's
    ``W_enc, W_dec`` hold this rank's blocks (:func:`shard_experts`)."""

    def __init__(self, group: Group, cfg: SAEConfig, capacity: float = 0.0):
        check_expert_parallel(cfg, group.size)
        self.group, self.capacity, self.n_experts = group, capacity, cfg.n_experts
        self.blocks = cfg.n_blocks // group.size
        width = self.blocks * cfg.expert_width
        self.latents = slice(group.rank * width, (group.rank + 1) * width)
        #: entries the last forward dropped for capacity (0 without a capacity factor)
        self.dropped = 0

    def forward(self, sae, x: Tensor, a: Assignment, decode: bool) -> tuple[Latents, Tensor | None, Tensor | None]:
        """``SwitchSAE._expert_forward`` across ranks: codes with global latent ids and ``x̂`` in
        token order, and this rank's share of the squared error (module docstring)."""
        n_tokens, ranks = a.n_tokens, self.group.size
        token, gate, counts = self._within_capacity(a)
        sent = torch.tensor(counts, dtype=torch.long).view(ranks, self.blocks)
        received = self.group.all_to_all(sent.to(self.group.device), [1] * ranks, [1] * ranks).cpu()
        route = Route(self.group, sent.sum(1).tolist(), received.sum(1).tolist())
        x_in, gate_in = RowExchange.apply(route, dispatch(x, token), gate)
        # rows arrive grouped by sender, then block: the expert compute wants them grouped by block
        block = torch.arange(self.blocks).repeat(ranks).repeat_interleave(received.flatten()).to(x.device)
        order = torch.argsort(block, stable=True)
        z, indices, x_hat, mse = sae.expert_compute(x_in.index_select(0, order), gate_in.index_select(0, order),
                                                    received.sum(0).tolist(), decode, x_hat_rows=order,
                                                    mse_tokens=n_tokens)
        arrival = torch.empty_like(order).index_copy_(0, order, torch.arange(order.numel(), device=x.device))
        z, indices = z.index_select(0, arrival), indices.index_select(0, arrival) + self.latents.start
        home = RowExchange.apply(route.reverse(), *([z, indices] if x_hat is None else [z, indices, x_hat]))
        z = z.new_zeros((n_tokens, z.shape[1])).index_copy(0, token, home[0])
        indices = indices.new_zeros((n_tokens, indices.shape[1])).index_copy(0, token, home[1])
        if x_hat is None:
            return Latents(z, indices), None, None
        unrouted = (sae.b_pre / sae.cfg.act_scale).expand(n_tokens, -1)
        x_hat = unrouted.index_copy(0, token, home[2])
        if self.dropped:  # tokens without an expert: x̂ = b_pre, their error counted here
            kept = torch.zeros(n_tokens, dtype=torch.bool, device=x.device).index_fill_(0, token, True)
            mse = mse + (x[~kept] - sae.b_pre).pow(2).sum() / n_tokens
        return Latents(z, indices), x_hat, mse

    def _within_capacity(self, a: Assignment) -> tuple[Tensor, Tensor, list[int]]:
        """The entries to send: all of them, or with a capacity factor ``c`` the first
        ``⌈c·T/N⌉`` of each expert (entries are grouped by expert, in token order)."""
        if not self.capacity:
            return a.token, a.gate, a.counts
        cap = math.ceil(self.capacity * a.n_tokens / self.n_experts)
        counts = torch.tensor(a.counts, device=a.token.device)
        within = torch.arange(a.token.numel(), device=a.token.device) - (counts.cumsum(0) - counts).repeat_interleave(
            counts)
        keep = within < cap
        self.dropped = a.token.numel() - int(keep.sum())
        return a.token[keep], a.gate[keep], [min(c, cap) for c in a.counts]

    def local(self, name: str, tensor: Tensor) -> Tensor:
        """This rank's rows of a full tensor (an expert parameter or its optimizer moments)."""
        return tensor[self.latents] if name in EXPERT_PARAMS and tensor.ndim == 2 else tensor

    def full(self, name: str, tensor: Tensor) -> Tensor:
        """The full tensor from every rank's rows (collective over the expert-parallel group)."""
        return self.group.gather(tensor) if name in EXPERT_PARAMS and tensor.ndim == 2 else tensor


def shard_experts(sae, group: Group, capacity: float = 0.0) -> ExpertParallel:
    """Keep only this rank's expert rows of ``sae`` (a Switch SAE) and route its forward through
    the exchange; the other parameters stay replicated."""
    ep = ExpertParallel(group, sae.cfg, capacity)
    for name in EXPERT_PARAMS:
        setattr(sae, name, nn.Parameter(ep.local(name, getattr(sae, name).detach()).clone()))
    sae._encoder_bf16 = None
    sae.expert_parallel = ep
    return ep
