"""Expert parallelism for Switch SAEs: experts split across ranks, tokens sent to their experts.

With ``P_e`` ranks in an expert-parallel group and ``N`` routed experts of ``m`` latents, rank
``j`` holds experts ``[j·N/P_e, (j+1)·N/P_e)``, i.e. rows ``[j·Nm/P_e, (j+1)·Nm/P_e)`` of
``W_enc`` and ``W_dec``; the router (``W_r``, ``b_r``), ``b_pre`` and the shared expert (rows
``[Nm, (N+1)m)``, appended after the rank's own rows) are replicated. The shared expert is
replicated, not owned: every token uses it, so an owner would receive the whole batch (``P_e``
times the rows of any other rank) and every token would cross the network once more; held by
every rank it runs on the home's own tokens, costs one expert of memory per rank, and its
gradient is averaged over all ranks like the router's. Each rank routes its own tokens; then

1. the entries' per-block counts are exchanged (an all-to-all of ``P_e × N/P_e`` integers), so
   every rank knows how many rows it receives from each peer for each of its experts;
2. each entry's input row and gate go to the rank owning its expert (exchange.py, one
   ``all_to_all_single`` of ``d + 1`` floats per entry, uneven and empty splits allowed);
3. with **one entry per token** (top1, hash, sinkhorn; expert choice at inference) the owner runs
   the same fused expert compute as one process (:meth:`SwitchSAE.expert_compute`: selection,
   sparse encode, decode and squared error) and sends back ``x̂`` and the code (``d + 3k`` words
   per entry); with **several entries per token** (top-e, a shared expert, expert choice in
   training) the one TopK over the union of a token's experts is taken at its home (union.py).

**The loss.** On the one-entry path the squared error of a token is computed where its expert
lives, so rank ``q``'s ``mse`` is ``S_q / T`` with ``S_q`` the squared error of the entries it
*received* and ``T`` its own batch; on the union path it is computed at the home. Either way
``L = (1/P) Σ_q ℓ_q`` over all ``P`` ranks is the one-process loss of the whole batch, and so is
the mean of the logged terms. Gradients follow: gates and partial reconstructions travel back
with the reverse exchanges (autograd functions), expert gradients stay on the owner, and
world.py divides every parameter's summed gradient by ``P``. A rank that receives no entries
still runs the expert compute on zero rows, so every rank calls every backward all-to-all.

**Capacity.** By default no entry is dropped (uneven splits cost nothing but balance). With a
capacity factor ``c``, each rank sends at most ``⌈c·T/N⌉`` entries to each routed expert (the
first in token order); a token left without entries is reconstructed by ``b_pre`` alone, its
squared error counted on its own rank, and the fraction of entries dropped is logged (``dropped``).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from switchsae.config import RoutingConfig, SAEConfig
from switchsae.distributed import union
from switchsae.distributed.exchange import Dispatched, Route, send
from switchsae.distributed.group import Group
from switchsae.saes.base import Latents
from switchsae.saes.routing import Assignment

#: the Switch SAE parameters split along the latent axis; all others are replicated
EXPERT_PARAMS = ("W_enc", "W_dec")


def check_expert_parallel(cfg: SAEConfig, ranks: int) -> None:
    """Refuse, in one line, an SAE that cannot be split across ``ranks`` expert-parallel ranks."""
    if cfg.arch != "switch":
        raise ValueError(f"expert parallelism splits a Switch SAE's experts; --arch {cfg.arch} has none "
                         "(use data parallelism alone)")
    if cfg.n_experts % ranks:
        raise ValueError(f"the {cfg.n_experts} experts do not split evenly across {ranks} expert-parallel ranks "
                         f"(choose an --expert-parallel size that divides {cfg.n_experts})")


def several_entries(routing: RoutingConfig, training: bool) -> bool:
    """Whether a token may have more than one entry (then the code is a TopK across ranks)."""
    return routing.shared_expert or (routing.router == "top_e" and routing.experts_per_token > 1) or (
        routing.router == "expert_choice" and training)


class ExpertParallel:
    """The exchange around a Switch SAE's expert compute (see the module docstring); the SAE's
    ``W_enc, W_dec`` hold this rank's experts, then the shared one (:func:`shard_experts`)."""

    def __init__(self, group: Group, cfg: SAEConfig, capacity: float = 0.0):
        check_expert_parallel(cfg, group.size)
        self.group, self.capacity, self.n_experts = group, capacity, cfg.n_experts
        self.routing = cfg.routing
        self.blocks = cfg.n_experts // group.size
        self.width = self.blocks * cfg.expert_width  # routed rows held here
        self.latents = slice(group.rank * self.width, (group.rank + 1) * self.width)
        self.shared = slice(cfg.n_experts * cfg.expert_width, cfg.width) if cfg.routing.shared_expert else None
        #: routed entries the last forward had, and how many of them the capacity dropped (0 without one)
        self.offered, self.dropped = 0, 0

    # -- layout -----------------------------------------------------------------------------
    def local(self, name: str, tensor: Tensor) -> Tensor:
        """This rank's rows of a full tensor (an expert parameter or its optimizer moments)."""
        if name not in EXPERT_PARAMS or tensor.ndim != 2:
            return tensor
        return tensor[self.latents] if self.shared is None else torch.cat([tensor[self.latents], tensor[self.shared]])

    def full(self, name: str, tensor: Tensor) -> Tensor:
        """The full tensor from every rank's rows (collective over the expert-parallel group)."""
        if name not in EXPERT_PARAMS or tensor.ndim != 2:
            return tensor
        routed = self.group.gather(tensor[:self.width])
        return routed if self.shared is None else torch.cat([routed, tensor[self.width:]])

    def global_ids(self, local: Tensor) -> Tensor:
        """Latent ids into the full SAE of ids into the rows held here."""
        if self.shared is None:
            return local + self.latents.start
        return torch.where(local < self.width, local + self.latents.start, local - self.width + self.shared.start)

    def row_groups(self, dp: Group, world: Group) -> list[tuple[slice, Group]]:
        """Which ranks share each range of the expert rows held here: the routed ones the
        data-parallel column, the shared expert's every rank."""
        routed = [(slice(0, self.width), dp)]
        return routed if self.shared is None else [*routed, (slice(self.width, None), world)]

    # -- forward ----------------------------------------------------------------------------
    def forward(self, sae, x: Tensor, a: Assignment, decode: bool,
                ) -> tuple[Latents, Tensor | None, Tensor | None, Dispatched]:
        """``SwitchSAE._expert_forward`` across ranks: codes with global latent ids and ``x̂`` in
        token order, this rank's share of the squared error (module docstring), and the rows at
        their owners (AuxK reuses them)."""
        sent = self.dispatch(sae, x, a)
        if several_entries(self.routing, sae.training):
            return (*union.forward(sae, self, sent, x, decode), sent)
        return (*self._one_entry(sae, sent, x, decode), sent)

    def dispatch(self, sae, x: Tensor, a: Assignment) -> Dispatched:
        """Exchange the counts, then send every routed entry's row and gate to its owner."""
        ranks = self.group.size
        routed = sum(a.counts[:self.n_experts])  # the shared expert's entries come last and stay here
        token, gate, counts = self._within_capacity(a.token[:routed], a.gate[:routed], a.counts[:self.n_experts],
                                                    a.n_tokens)
        sent = torch.tensor(counts, dtype=torch.long).view(ranks, self.blocks)
        received = self.group.all_to_all(sent.to(self.group.device), [1] * ranks, [1] * ranks).cpu()
        route = Route(self.group, sent.sum(1).tolist(), received.sum(1).tolist())
        return Dispatched.send_rows(route, received, x, token, gate, self.shared is not None)

    def _one_entry(self, sae, sent: Dispatched, x: Tensor, decode: bool):
        """One entry per token: the fused expert compute at the owner, ``x̂`` and codes back."""
        n_tokens = x.shape[0]
        z, indices, x_hat, mse = sae.expert_compute(sent.x, sent.gate, sent.counts, decode, x_hat_rows=sent.order,
                                                    mse_tokens=n_tokens)
        arrival = sent.arrival
        z, indices = z.index_select(0, arrival), self.global_ids(indices.index_select(0, arrival))
        # x̂ comes out of the kernel in arrival order already
        home = send(sent.route.reverse(), [z, indices] if x_hat is None else [z, indices, x_hat], differentiable=True)
        token = sent.token
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

    def auxk_loss(self, sae, x: Tensor, out, dead: Tensor) -> Tensor:
        """AuxK with the experts on their owners (union.py), on the rows the forward dispatched."""
        return union.auxk_loss(sae, self, out.extras["dispatched"], x, out, dead)

    def _within_capacity(self, token: Tensor, gate: Tensor, counts: list[int],
                         n_tokens: int) -> tuple[Tensor, Tensor, list[int]]:
        """The entries to send: all of them, or with a capacity factor ``c`` the first
        ``⌈c·T/N⌉`` of each expert (entries are grouped by expert, in token order)."""
        self.offered = token.numel()
        if not self.capacity:
            return token, gate, counts
        cap = math.ceil(self.capacity * n_tokens / self.n_experts)
        per_expert = torch.tensor(counts, device=token.device)
        within = torch.arange(token.numel(), device=token.device) - (per_expert.cumsum(0) - per_expert
                                                                     ).repeat_interleave(per_expert)
        keep = within < cap
        self.dropped = token.numel() - int(keep.sum())
        return token[keep], gate[keep], [min(c, cap) for c in counts]


def shard_experts(sae, group: Group, capacity: float = 0.0) -> ExpertParallel:
    """Keep only this rank's expert rows of ``sae`` (a Switch SAE; the shared expert stays whole)
    and route its forward through the exchange; the other parameters stay replicated."""
    ep = ExpertParallel(group, sae.cfg, capacity)
    for name in EXPERT_PARAMS:
        setattr(sae, name, nn.Parameter(ep.local(name, getattr(sae, name).detach()).clone()))
    sae._encoder_bf16 = None
    sae.expert_parallel = ep
    return ep
