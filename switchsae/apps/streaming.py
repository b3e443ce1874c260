"""Bounded per-feature summaries updated batch by batch: memory depends on the number of
features, never on the number of tokens.

- :class:`BestPerSlot` keeps, for each slot, the ``n`` entries with the largest scores offered so
  far (top activations: score = activation; a uniform random sample: score = −u, ``u ~ U(0,1)``
  drawn per entry, so the kept entries are the ``n`` smallest keys, a bottom-``n`` sketch).
- :class:`Pow2Histogram` keeps, for each row, a histogram of positive values over ``[0, 2^e]``
  with ``e`` the smallest integer such that every value seen is ``≤ 2^e``.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

Payload = dict[str, Tensor]


def _rank_within(groups: Tensor) -> Tensor:
    """Position of each entry among the entries of its group, for ``groups`` sorted ascending."""
    _, counts = torch.unique_consecutive(groups, return_counts=True)
    starts = (counts.cumsum(0) - counts).repeat_interleave(counts)
    return torch.arange(groups.numel(), device=groups.device) - starts


class BestPerSlot:
    """For each of ``n_slots`` slots, the ``n`` entries with the largest scores offered so far.

    ``scores: [S, n]`` is kept sorted in descending order per slot (``-inf`` marks an empty place);
    each payload table ``[S, n, *shape]`` holds what belongs to the entry in the same place.
    :meth:`offer` equals one ``topk`` over every entry ever offered to a slot (ties aside) at the
    cost of the batch only: candidates not above their slot's ``n``-th score are dropped, the rest
    are ranked within their slot, and the best ``n`` per slot are merged with the slot's table by
    a ``topk`` over ``2n``. Payloads are computed only for the candidates that survive the ranking.
    """

    def __init__(self, n_slots: int, n: int, payload: dict[str, tuple[tuple[int, ...], torch.dtype, float]]):
        self.n = n
        self.scores = torch.full((n_slots, n), float("-inf"))
        self.payload = {name: torch.full((n_slots, n, *shape), fill, dtype=dtype)
                        for name, (shape, dtype, fill) in payload.items()}
        self._fill = {name: fill for name, (_, _, fill) in payload.items()}

    def offer(self, slots: Tensor, scores: Tensor, payload_of: Callable[[Tensor], Payload]) -> None:
        """Offer candidates ``(slots[i], scores[i])``; ``payload_of(idx)`` gives the payload tensors
        (``[len(idx), *shape]``, at least those of the tables) of the candidates ``idx``."""
        idx = (scores > self.scores[:, -1].index_select(0, slots)).nonzero().squeeze(1)
        if idx.numel() == 0:
            return
        idx = idx.index_select(0, scores.index_select(0, idx).argsort(descending=True))
        idx = idx.index_select(0, slots.index_select(0, idx).argsort(stable=True))
        rank = _rank_within(slots.index_select(0, idx))
        kept = (rank < self.n).nonzero().squeeze(1)
        idx, rank = idx.index_select(0, kept), rank.index_select(0, kept)
        touched, group = torch.unique_consecutive(slots.index_select(0, idx), return_inverse=True)
        place = group * self.n + rank  # flat position in a [len(touched), n] table
        offered = self.scores.new_full((len(touched) * self.n,), float("-inf")).index_copy_(0, place, scores.index_select(0, idx))
        merged = torch.cat([self.scores.index_select(0, touched), offered.view(-1, self.n)], 1)
        best, pick = merged.topk(self.n, dim=1)
        self.scores.index_copy_(0, touched, best)
        payload = payload_of(idx)
        for name, table in self.payload.items():
            shape = table.shape[2:]
            new = table.new_full((len(touched) * self.n, *shape), self._fill[name]).index_copy_(0, place, payload[name])
            both = torch.cat([table.index_select(0, touched), new.view(len(touched), self.n, *shape)], 1)
            table.index_copy_(0, touched, both.gather(1, pick.view(*pick.shape, *[1] * len(shape)).expand(-1, -1, *shape)))

    def take(self, slots: Tensor) -> tuple[Tensor, Tensor, Payload]:
        """Remove every entry of ``slots`` and return them as ``(slot, score, payload)`` candidates."""
        scores = self.scores.index_select(0, slots)
        filled = (scores > float("-inf")).flatten().nonzero().squeeze(1)
        slot = slots.index_select(0, filled // self.n)
        payload = {name: table.index_select(0, slots).flatten(0, 1).index_select(0, filled)
                   for name, table in self.payload.items()}
        self.scores.index_fill_(0, slots, float("-inf"))
        for name, table in self.payload.items():
            table.index_fill_(0, slots, self._fill[name])
        return slot, scores.flatten().index_select(0, filled), payload


class Pow2Histogram:
    """Per-row histograms of positive values, ``n_bins`` equal bins over ``[0, 2^e_j]``::

        e_j      = max over values v of row j of ⌈log2 v⌉          (so max_j ≤ 2^e_j < 2·max_j)
        bin(v)   = min(⌊n_bins · v / 2^e_j⌋, n_bins − 1)

    When a larger value raises ``e_j`` by ``s``, old bin ``b`` falls into new bin ``b >> s``
    (``n_bins`` is a power of two, so new edges are a subset of old ones): the counts equal those
    of a single pass binned with the final ``e_j``, without a second pass over the data.
    """

    EMPTY = -127  # exponent of a row that has seen no value yet

    def __init__(self, n_rows: int, n_bins: int = 32):
        if n_bins < 1 or n_bins & (n_bins - 1):
            raise ValueError(f"n_bins must be a power of two, got {n_bins}.")
        self.n_bins = n_bins
        self.exponent = torch.full((n_rows,), self.EMPTY, dtype=torch.int32)
        self.counts = torch.zeros(n_rows, n_bins, dtype=torch.int32)

    def bin_of(self, rows: Tensor, values: Tensor, n_bins: int) -> Tensor:
        """Bin of each value among ``n_bins`` equal bins over ``[0, 2^e_row]`` (current exponents)."""
        scaled = torch.ldexp(values.float(), -self.exponent.index_select(0, rows).to(torch.float32)) * n_bins
        return scaled.floor_().long().clamp_(0, n_bins - 1)

    def add(self, rows: Tensor, values: Tensor) -> Tensor:
        """Count ``values`` (all > 0) into their ``rows``; return the rows whose range grew."""
        mantissa, exponent = torch.frexp(values.float())  # v = m·2^x, m in [0.5, 1): ⌈log2 v⌉ = x, or x−1 at m = 0.5
        needed = exponent - (mantissa == 0.5).int()
        grown_exp = self.exponent.scatter_reduce(0, rows, needed.clamp(min=self.EMPTY + 1), "amax")
        grown = (grown_exp > self.exponent).nonzero().squeeze(1)
        if grown.numel():
            shift = (grown_exp.index_select(0, grown) - self.exponent.index_select(0, grown)).clamp(max=31)
            merged = torch.arange(self.n_bins)[None, :] >> shift[:, None]
            old = self.counts.index_select(0, grown)
            self.counts.index_copy_(0, grown, torch.zeros_like(old).scatter_add_(1, merged.long(), old))
            self.exponent = grown_exp
        flat = rows * self.n_bins + self.bin_of(rows, values, self.n_bins)
        self.counts.view(-1).index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
        return grown
