"""Rows to the ranks owning their experts and back: the all-to-all of expert parallelism.

A home rank's routed entries (one row each: the token's normalised input and its gate) travel to
the rank holding their expert (:class:`Route`, one ``all_to_all_single`` with uneven and empty
splits, the split sizes exchanged first); the owner keeps them grouped by its local expert block,
the order its expert compute wants. :class:`Dispatched` remembers both orders, so any per-row
result of the owner goes back to the home in the home's entry order (:meth:`Dispatched.to_homes`)
and any per-entry tensor of the home reaches the owner's rows (:meth:`Dispatched.to_owners`),
with or without autograd (:class:`RowExchange`: the backward sends the gradients along the
reverse route, so the backward runs the same all-to-alls in the opposite direction).

Entries of the shared expert (a block every rank holds, expert_parallel.py) never travel: the
owner's rows end with the home's own shared entries, and both directions pass them through.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from switchsae.distributed.group import Group


@dataclass(frozen=True)
class Route:
    """Who sends how many rows to whom: ``send[r]`` rows to rank ``r``, ``recv[r]`` from it."""

    group: Group
    send: list[int]
    recv: list[int]

    def reverse(self) -> Route:
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


def send(route: Route, tensors: Sequence[Tensor], differentiable: bool) -> list[Tensor]:
    """``tensors`` along ``route``, through autograd or not."""
    return list(RowExchange.apply(route, *tensors)) if differentiable else route.exchange(tensors)


@dataclass
class Dispatched:
    """Entries at their owners, and the way back.

    Owner's view: ``x, gate: [R, d], [R]`` the rows it computes, grouped by local block
    (``counts[b]`` rows for block ``b``: its routed blocks, then the shared block if there is one);
    the first ``n_received`` are the entries other ranks (and itself) sent, ``order[i]`` being the
    arrival index of sorted row ``i``; the rest are this rank's own shared entries, in token order.
    Home's view: ``token: [E]`` the token of each of its entries in the order :meth:`to_homes`
    returns them (sent entries in sending order, then its shared entries), of ``n_tokens``.
    """

    route: Route
    x: Tensor
    gate: Tensor
    counts: list[int]
    order: Tensor
    n_received: int
    token: Tensor
    n_tokens: int

    @classmethod
    def send_rows(cls, route: Route, received: Tensor, x: Tensor, token: Tensor, gate: Tensor,
                  shared: bool) -> Dispatched:
        """Send entry rows ``x[token]`` and ``gate`` (grouped by expert, so by destination) along
        ``route``; ``received: [ranks, blocks]`` counts what arrives per sender and local block.
        With ``shared`` the home's every token is also an entry of the (local) shared block."""
        x_in, gate_in = RowExchange.apply(route, x.index_select(0, token), gate)
        ranks, blocks = received.shape
        block = torch.arange(blocks, device=x.device).repeat(ranks).repeat_interleave(received.flatten().to(x.device))
        order = torch.argsort(block, stable=True)
        x_rows, gate_rows = x_in.index_select(0, order), gate_in.index_select(0, order)
        counts = received.sum(0).tolist()
        if shared:
            home = torch.arange(x.shape[0], device=x.device)
            x_rows, gate_rows = torch.cat([x_rows, x]), torch.cat([gate_rows, torch.ones_like(home, dtype=gate.dtype)])
            counts, token = counts + [x.shape[0]], torch.cat([token, home])
        return cls(route, x_rows, gate_rows, counts, order, order.numel(), token, x.shape[0])

    @property
    def arrival(self) -> Tensor:
        """The sorted position of every arrival index (the inverse of ``order``)."""
        return torch.empty_like(self.order).index_copy_(0, self.order, torch.arange(self.n_received,
                                                                                    device=self.order.device))

    def to_homes(self, tensors: Sequence[Tensor], differentiable: bool = False) -> list[Tensor]:
        """Per-row results of the owner (``[R, ...]``, block order) as per-entry tensors at their
        homes (``[E, ...]``, the order of ``token``)."""
        arrival, n = self.arrival, self.n_received
        back = send(self.route.reverse(), [t[:n].index_select(0, arrival) for t in tensors], differentiable)
        return [torch.cat([home, t[n:]]) for home, t in zip(back, tensors)]

    def to_owners(self, tensors: Sequence[Tensor], differentiable: bool = False) -> list[Tensor]:
        """Per-entry tensors of the home (``[E, ...]``, the order of ``token``) at the owner's rows."""
        n = sum(self.route.send)
        there = send(self.route, [t[:n] for t in tensors], differentiable)
        return [torch.cat([arrived.index_select(0, self.order), t[n:]]) for arrived, t in zip(there, tensors)]
