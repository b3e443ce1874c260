"""Routers: normalised activations → one :class:`Assignment` of (token, expert, gate) entries.

Notation (SPEC §1): ``x: [T, d]`` normalised activations, ``N`` routed experts, router
``W_r: N×d`` and ``b_r ∈ R^d``, logits ``ℓ = W_r (x − b_r)`` and probabilities ``p = softmax(ℓ)``.
A router turns them into entries ``(t, e, g)``: token ``t`` is encoded by expert ``e`` and that
expert's latents are scaled by the gate ``g`` (``p_{t,e}`` for a learned router, which is what
makes it trainable; 1 where nothing is learned). Every consumer reads the same object: the
expert compute (kernels/dispatch.py), the auxiliary losses (owned by the router), the
expert-load metrics, AuxK, steering and the all-to-all of expert parallelism
(distributed/exchange.py).

Strategies (``RoutingConfig.router``; cost per token in encoder rows: ``e·M/N``):

- ``top1`` (the paper): ``e_t = argmax_i p_{t,i}``, ``g = p_{t,e_t}``; one entry per token.
- ``top_e``: the ``e`` most probable experts, gates ``p_{t,i}``; the SAE then takes one TopK
  over the union of their latents (Xu et al.'s Scale SAE).
- ``expert_choice`` (Zhou et al.): in training each expert takes the ``C = ⌈c·T/N⌉`` tokens it
  gives the highest probability, so a token gets 0..N entries; a token no expert picks is
  encoded by no latent (``x̂ = b_pre``), and the fraction of such tokens is reported
  (``unrouted``). At inference (``sae.eval()``) it routes like ``top1``.
- ``hash`` (Roller et al.): ``e_t = h(token id) mod N`` with a fixed multiplicative hash, gate 1;
  needs each row's token id; nothing is learned.
- ``sinkhorn`` (balanced assignment, as BASE layers): in training ``e_t = argmax_i Q_{t,i}``
  where ``Q`` is ``exp(ℓ)`` balanced by Sinkhorn iterations to equal row sums and equal column
  sums; gate ``p_{t,e_t}``; at inference ``top1``.

Any of them may add a shared expert (``shared_expert``): block ``N`` of the latents, one more
entry ``(t, N, 1)`` for every token. Auxiliary losses: the load-balance loss
``α · N Σ_i f_i P_i`` (``f_i`` the fraction of routed entries sent to ``i``, no gradient;
``P_i`` the mean router probability; 1 for a uniform router) for ``top1``/``top_e``, and the
router z-loss ``mean_t (logsumexp_i ℓ_{t,i})²`` for any learned router.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from switchsae.config import RoutingConfig
from switchsae.distributed.group import LOCAL, Group


@dataclass
class Assignment:
    """Routing of one batch: ``E`` entries grouped by expert (in token order within an expert).

    ``token, expert: [E]`` int64 and ``gate: [E]`` (differentiable where the router learns);
    ``counts[e]`` entries go to expert block ``e`` (host ints, the all-to-all's split sizes);
    ``logits, probs: [T, N]`` for the routed experts (None for hash routing).
    """

    token: Tensor
    expert: Tensor
    gate: Tensor
    counts: list[int]
    n_tokens: int
    logits: Tensor | None = None
    probs: Tensor | None = None

    @property
    def one_per_token(self) -> bool:
        """Whether every token has exactly one entry (then ``token`` is a permutation of ``0..T-1``)."""
        return self.token.numel() == self.n_tokens and bool(
            (torch.bincount(self.token, minlength=self.n_tokens) == 1).all())

    def tokens_per_expert(self) -> Tensor:
        """Entries per expert block, ``[blocks]`` int64 (on the host)."""
        return torch.tensor(self.counts, dtype=torch.long)

    def unrouted_fraction(self) -> float:
        """Fraction of tokens with no entry (only expert-choice routing leaves any)."""
        routed = torch.zeros(self.n_tokens, dtype=torch.bool, device=self.token.device)
        routed[self.token] = True
        return 1.0 - routed.float().mean().item() if self.n_tokens else 0.0


def assignment_from_entries(token: Tensor, expert: Tensor, gate: Tensor, n_blocks: int, n_tokens: int,
                            logits: Tensor | None = None, probs: Tensor | None = None) -> Assignment:
    """Group entries given in token-major order by expert (stable) into an :class:`Assignment`."""
    order = torch.argsort(expert, stable=True)
    counts = torch.bincount(expert, minlength=n_blocks).tolist()
    return Assignment(token.index_select(0, order), expert.index_select(0, order), gate.index_select(0, order),
                      counts, n_tokens, logits, probs)


def top1(probs: Tensor, logits: Tensor) -> Assignment:
    """``e_t = argmax_i p_{t,i}``, gate ``p_{t,e_t}``: one entry per token."""
    expert = probs.argmax(dim=-1)
    token = torch.arange(probs.shape[0], device=probs.device)
    gate = probs.gather(1, expert[:, None]).squeeze(1)
    return assignment_from_entries(token, expert, gate, probs.shape[1], probs.shape[0], logits, probs)


def forced(probs: Tensor | None, n_tokens: int, expert: int, n_blocks: int, device: torch.device) -> Assignment:
    """Every token to expert ``expert`` (steering), gated by the token's own top-1 probability
    ``max_i p_{t,i}``, the scale its code has under top-1 routing (1 without a router)."""
    token = torch.arange(n_tokens, device=device)
    chosen = torch.full_like(token, expert)
    gate = probs.max(dim=-1).values if probs is not None else torch.ones(n_tokens, device=device)
    return assignment_from_entries(token, chosen, gate, n_blocks, n_tokens, None, probs)


class Router:
    """A routing strategy: ``assign`` maps the router's outputs to an :class:`Assignment`;
    ``aux_losses`` are the terms it adds to the loss. Subclasses say what they need as class
    attributes: ``learned`` (uses ``W_r``, ``b_r``), ``needs_token_ids``."""

    learned: ClassVar[bool] = True
    needs_token_ids: ClassVar[bool] = False
    balance_loss: ClassVar[bool] = False

    def __init__(self, cfg: RoutingConfig, n_experts: int):
        self.cfg, self.n_experts = cfg, n_experts
        #: the ranks whose shards form the batch a batch-wide strategy (expert choice, Sinkhorn) balances
        self.batch_group: Group = LOCAL

    def assign(self, logits: Tensor | None, probs: Tensor | None, token_ids: Tensor | None,
               training: bool) -> Assignment:
        raise NotImplementedError

    def aux_losses(self, a: Assignment, unit: float) -> dict[str, Tensor]:
        """``balance = α N Σ_i f_i P_i`` (where the strategy balances by loss) and ``z_loss``, both
        times ``unit`` (``SwitchSAE.aux_unit``: so that the weights are relative to the MSE of
        activations scaled to mean norm √d whether or not training normalises them)."""
        losses = {}
        if self.balance_loss:
            assert a.probs is not None  # a router that balances by loss is learned: it has probabilities
            losses["balance"] = self.cfg.aux_coeff * load_balance_loss(a.probs, a.counts[:self.n_experts]) * unit
        if self.learned and self.cfg.z_loss_coeff:
            assert a.logits is not None  # a learned router's assignment carries its logits
            losses["z_loss"] = self.cfg.z_loss_coeff * torch.logsumexp(a.logits, dim=-1).pow(2).mean() * unit
        return losses


def load_balance_loss(probs: Tensor, counts: list[int]) -> Tensor:
    """``N Σ_i f_i P_i`` with ``f_i = counts_i / Σ counts``: 1 for a uniform router, larger the
    more entries pile onto likely experts."""
    n_experts = probs.shape[1]
    f = torch.tensor(counts, device=probs.device).to(probs.dtype) / max(sum(counts), 1)
    return n_experts * (f * probs.mean(0)).sum()


class TopOne(Router):
    """``top1``: the paper's Switch routing."""

    balance_loss = True

    def assign(self, logits, probs, token_ids, training):
        return top1(probs, logits)


class TopE(Router):
    """``top_e``: the ``e`` most probable experts per token, gates their probabilities."""

    balance_loss = True

    def assign(self, logits, probs, token_ids, training):
        e = self.cfg.experts_per_token
        gates, experts = probs.topk(e, dim=-1)
        token = torch.arange(probs.shape[0], device=probs.device).repeat_interleave(e)
        return assignment_from_entries(token, experts.flatten(), gates.flatten(), self.n_experts, probs.shape[0],
                                       logits, probs)


class ExpertChoice(Router):
    """``expert_choice``: each expert takes its ``⌈c·T/N⌉`` most probable tokens (training); over a
    batch split across ranks, of the whole batch (the tokens at or above each expert's ``C``-th
    largest probability over every rank, so a rank's count per expert varies)."""

    def assign(self, logits, probs, token_ids, training):
        if not training:
            return top1(probs, logits)
        n_tokens, group = probs.shape[0], self.batch_group
        total = n_tokens * group.size
        capacity = min(total, -(-int(self.cfg.capacity_factor * total) // self.n_experts))
        if group.size > 1:
            chosen = probs.t() >= group.kth_largest(probs.t().detach(), capacity)[:, None]  # [N, T]
            expert, tokens = chosen.nonzero(as_tuple=True)  # grouped by expert, in token order
            return Assignment(tokens, expert, probs[tokens, expert], chosen.sum(1).tolist(), n_tokens, logits, probs)
        gates, tokens = probs.t().topk(capacity, dim=-1)  # [N, C]
        expert = torch.arange(self.n_experts, device=probs.device).repeat_interleave(capacity)
        # entries already grouped by expert; within an expert, in token order
        tokens, within = tokens.sort(dim=-1)
        gates = gates.gather(1, within)
        return Assignment(tokens.flatten(), expert, gates.flatten(), [capacity] * self.n_experts, n_tokens,
                          logits, probs)


class Hash(Router):
    """``hash``: expert ``h(token id) mod N`` with Knuth's multiplicative hash, gate 1."""

    learned = False
    needs_token_ids = True
    multiplier: ClassVar[int] = 2654435761

    def assign(self, logits, probs, token_ids, training):
        if token_ids is None:
            raise ValueError("hash routing needs the token id of every activation row; read the batches from an "
                             "activation cache that stores token ids (switchsae cache).")
        expert = (token_ids.long() * self.multiplier % 2**32) % self.n_experts
        token = torch.arange(token_ids.shape[0], device=token_ids.device)
        gate = torch.ones(token_ids.shape[0], device=token_ids.device)
        return assignment_from_entries(token, expert, gate, self.n_experts, token_ids.shape[0])


class Sinkhorn(Router):
    """``sinkhorn``: a balanced top-1 assignment in training, plain top-1 at inference; columns
    are balanced over the whole batch (every rank of ``batch_group``)."""

    iterations: ClassVar[int] = 10

    def assign(self, logits, probs, token_ids, training):
        if not training:
            return top1(probs, logits)
        group = self.batch_group
        with torch.no_grad():
            log_q = logits.float() - group.max(logits.float().max())
            for _ in range(self.iterations):  # rows sum to 1, columns to T/N, in log space
                log_q = log_q - group.logsumexp(log_q) + torch.log(
                    torch.tensor(probs.shape[0] * group.size / self.n_experts))
                log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True)
            expert = log_q.argmax(dim=-1)
        token = torch.arange(probs.shape[0], device=probs.device)
        gate = probs.gather(1, expert[:, None]).squeeze(1)
        return assignment_from_entries(token, expert, gate, self.n_experts, probs.shape[0], logits, probs)


ROUTER_CLASSES: dict[str, type[Router]] = {"top1": TopOne, "top_e": TopE, "expert_choice": ExpertChoice,
                                           "hash": Hash, "sinkhorn": Sinkhorn}


def build_router(cfg: RoutingConfig, n_experts: int) -> Router:
    """The strategy ``cfg.router`` for ``n_experts`` routed experts."""
    return ROUTER_CLASSES[cfg.router](cfg, n_experts)


def with_shared_expert(a: Assignment, shared: int) -> Assignment:
    """``a`` plus an entry ``(t, shared, 1)`` for every token (the always-on expert block ``shared``)."""
    token = torch.arange(a.n_tokens, device=a.token.device)
    gate = torch.ones(a.n_tokens, dtype=a.gate.dtype, device=a.gate.device)
    return Assignment(torch.cat([a.token, token]), torch.cat([a.expert, torch.full_like(token, shared)]),
                      torch.cat([a.gate, gate]), a.counts + [a.n_tokens], a.n_tokens, a.logits, a.probs)
