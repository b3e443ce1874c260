"""Per-feature statistics and examples from one streaming pass of an SAE over batches of whole
token windows.

For a selected feature ``j`` (its code value ``z_j`` as :meth:`SparseAutoencoder.decode` uses
it; for Switch SAEs that includes the router gate) over the ``T`` rows read:

    count_j   = #{t : z_tj > 0},          density_j = count_j / T,   mean_j = Σ_t z_tj / count_j
    hist_j    = :class:`~switchsae.apps.streaming.Pow2Histogram` of the positive z_tj
    top_j     = the rows with the largest z_tj (with their contexts)
    samples_j = for each of ``intervals`` equal parts of ``[0, 2^e_j]`` (the histogram's range),
                a uniform random sample of the rows whose z_tj falls in it: the ``per_interval``
                smallest of a key ``u_tj ~ U(0, 1)`` drawn per firing. When ``e_j`` grows, kept
                samples are re-filed into the new parts; a union of bottom-n sketches keeps the
                bottom n of the union, so the samples stay uniform.
    router_j  = mean and max of p_{e(j)}(x_t) over the firing rows, ``e(j) = j // (M/N)``

An example's context is ``z_j`` on the rows ``before`` tokens before to ``after`` tokens after it
in the same window, taken from the batch that holds the example (batches are whole windows), so
no row is ever encoded twice. Positions without a cached row (the dropped attention sink, the
window's edges) hold NaN. Memory: ``O(F · (top + intervals · per_interval) · context)``.
"""
from __future__ import annotations

from functools import cache

import torch
from torch import Tensor

from switchsae.apps.streaming import BestPerSlot, Payload, Pow2Histogram
from switchsae.saes import Latents


def firing_entries(latents: Latents) -> tuple[Tensor, Tensor, Tensor]:
    """``(row, latent, value)`` of every positive code entry (sparse or dense codes alike), ordered
    by row and, within a row, by latent."""
    values, columns = latents.values, latents.values.shape[1]
    if latents.indices is not None:
        indices, order = latents.indices.sort(dim=1)
        values = values.gather(1, order)
    fired = (values > 0).flatten().nonzero().squeeze(1)
    latent = fired % columns if latents.indices is None else indices.flatten().index_select(0, fired)
    return fired // columns, latent, values.flatten().index_select(0, fired)


class _BatchCodes:
    """One batch's firing entries (at least one), ordered by row and feature as
    :func:`firing_entries` gives them, as keys ``row · F + feature`` (ascending), to look up ``z``."""

    def __init__(self, row: Tensor, feature: Tensor, value: Tensor, n_features: int):
        self.keys, self.values, self.n_features = row * n_features + feature, value, n_features

    def at(self, rows: Tensor, features: Tensor) -> Tensor:
        """``z`` of ``features`` on ``rows`` (same shape; 0 where it did not fire)."""
        key = (rows * self.n_features + features).flatten()
        pos = torch.searchsorted(self.keys, key).clamp_(max=len(self.keys) - 1)
        found = self.keys.index_select(0, pos) == key
        return torch.where(found, self.values.index_select(0, pos), 0.0).view(rows.shape)


class FeatureCollector:
    """Accumulates the statistics of ``features`` (global latent ids, ascending) batch by batch; see
    the module doc. ``intervals`` must divide ``bins``, a power of two (:class:`InspectConfig` checks)."""

    def __init__(self, features: Tensor, width: int, expert_width: int, rows_per_window: int, *, top: int,
                 intervals: int, per_interval: int, bins: int, before: int, after: int, seed: int = 0):
        n = len(features)
        self.features, self.expert_width, self.rows_per_window = features, expert_width, rows_per_window
        self.intervals, self.offsets = intervals, torch.arange(-before, after + 1)
        self.lookup = torch.full((width,), -1, dtype=torch.long)
        self.lookup[features] = torch.arange(n)
        self.rows = 0
        self.count = torch.zeros(n, dtype=torch.long)
        self.total = torch.zeros(n, dtype=torch.float64)
        self.prob_total = torch.zeros(n, dtype=torch.float64)
        self.prob_max = torch.zeros(n)
        self.routed = False  # whether router probabilities came with the codes
        self.hist = Pow2Histogram(n, bins)
        example = {"row": ((), torch.long, -1), "context": ((len(self.offsets),), torch.float16, float("nan"))}
        self.top = BestPerSlot(n, top, example)
        self.samples = BestPerSlot(n * intervals, per_interval, {**example, "value": ((), torch.float32, 0.0)})
        self._generator = torch.Generator().manual_seed(seed)

    def add(self, first_row: int, latents: Latents, probs: Tensor | None) -> None:
        """Fold in the codes of global rows ``[first_row, first_row + T)``, ``first_row`` at a
        window's start; ``probs: [T, blocks]`` each expert block's router probability (None without
        a learned router)."""
        n_rows = latents.values.shape[0]
        self.rows += n_rows
        row, latent, value = firing_entries(latents)
        feature = self.lookup.index_select(0, latent)
        keep = (feature >= 0).nonzero().squeeze(1)
        if len(keep) < len(feature):
            row, latent, feature, value = (t.index_select(0, keep) for t in (row, latent, feature, value))
        if value.numel() == 0:
            return
        value = value.float()
        self.count += torch.bincount(feature, minlength=len(self.count))
        self.total.index_add_(0, feature, value.double())
        if probs is not None:
            self.routed = True
            prob = probs.float().flatten().index_select(0, row * probs.shape[1] + latent // self.expert_width)
            self.prob_total.index_add_(0, feature, prob.double())
            self.prob_max.scatter_reduce_(0, feature, prob, "amax")
        self._refile_samples(self.hist.add(feature, value))
        @cache
        def codes() -> _BatchCodes:  # built only if some example of this batch is kept
            return _BatchCodes(row, feature, value, len(self.count))

        def example(idx: Tensor) -> Payload:
            at, of = row.index_select(0, idx), feature.index_select(0, idx)
            return {"row": first_row + at, "context": self._context(codes(), at, of, n_rows),
                    "value": value.index_select(0, idx)}

        self.top.offer(feature, value, example)
        key = torch.rand(value.shape, generator=self._generator)
        self.samples.offer(self._sample_slot(feature, value), -key, example)

    def _sample_slot(self, feature: Tensor, value: Tensor) -> Tensor:
        return feature * self.intervals + self.hist.bin_of(feature, value, self.intervals)

    def _refile_samples(self, grown: Tensor) -> None:
        """Move the kept samples of features whose histogram range grew into their new intervals."""
        if grown.numel() == 0:
            return
        slots = (grown[:, None] * self.intervals + torch.arange(self.intervals)).flatten()
        slot, score, payload = self.samples.take(slots)
        new_slot = self._sample_slot(slot // self.intervals, payload["value"])
        self.samples.offer(new_slot, score, lambda idx: {name: t.index_select(0, idx) for name, t in payload.items()})

    def _context(self, codes: _BatchCodes, row: Tensor, feature: Tensor, n_rows: int) -> Tensor:
        """``z`` of each feature on the rows around each of its examples, NaN outside the window."""
        around = row[:, None] + self.offsets
        inside = (around >= 0) & (around < n_rows) & (around // self.rows_per_window == row[:, None] // self.rows_per_window)
        values = codes.at(around.clamp(0, n_rows - 1), feature[:, None])
        return torch.where(inside, values, float("nan")).half()
