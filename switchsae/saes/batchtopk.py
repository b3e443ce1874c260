"""BatchTopK SAE (Bussmann et al., 2024): the top ``T·k`` activations of the whole batch."""
from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from switchsae.config import SAEConfig
from switchsae.kernels.sparse import gather_dot
from switchsae.saes.topk import TopKSAE


class BatchTopKSAE(TopKSAE):
    """TopK with the budget shared across the batch, SPEC §1::

        a = ReLU(W_enc (x − b_pre) + b_enc)                           [T, M]   (b_enc = 0 without cfg.encoder_bias)
        training:   z = a ⊙ 1[a among the T·k largest entries of the batch]
        inference:  z = a ⊙ 1[a > θ]                                  (no batch dependence)
        x̂ = W_dec z + b_pre,      loss ‖x − x̂‖²

    Tokens get a variable number of latents, ``k`` on average. ``θ`` is a buffer (saved with the
    weights): an exponential moving average, with decay ``threshold_decay``, of the smallest
    positive selected activation of each training batch; the first batch sets it directly. Until
    then it is 0, i.e. inference keeps every positive activation. Codes stay sparse:
    ``values, indices: [T, K_max]`` with ``K_max`` the largest per-token count and padding
    entries value 0, index 0 (their ReLU at 0 passes no gradient). As for TopK, selection is one
    no-grad matmul and only the selected latents enter the graph; the kernels, the optional
    encoder bias and the FLOP count are TopK's, with ``k`` the mean count per token.
    """

    #: weight of the running threshold estimate kept at each training batch
    threshold_decay: ClassVar[float] = 0.99
    #: the inference threshold (a buffer)
    threshold: Tensor

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros(()))

    def _select(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The batch (training) or threshold (inference) selection; updates ``threshold`` in training."""
        with torch.no_grad():
            centred = x - self.b_pre
            W_selection = self.selection_weights()
            acts = torch.mm(centred.to(W_selection.dtype), W_selection.t())
            if self.b_enc is not None:
                acts += self.b_enc.to(acts.dtype)
            acts.relu_()
            keep = self._batch_topk(acts) if self.training else acts > self.threshold
            indices, valid = pack_rows(keep)
            if acts.dtype == torch.float32:
                chosen = acts.gather(1, indices)
            else:  # bf16 selection: recompute the chosen pre-activations exactly, in fp32
                chosen = gather_dot(centred, self.W_enc, indices)
                if self.b_enc is not None:
                    chosen += self.b_enc[indices]
            values = chosen.float() * valid
            if self.training:
                self._update_threshold(values[valid])
        return indices, values, centred

    def _batch_topk(self, acts: Tensor) -> Tensor:
        """Mask of the ``T·k`` largest entries of ``acts: [T, M]``; over a batch split across ranks
        (``batch_group``) the ``T·k·P`` largest of the whole batch: the entries at or above its
        ``T·k·P``-th largest value (:meth:`Group.kth_largest`), positive ones only (a zero adds
        nothing to a code, and the one-process TopK keeps zeros only to fill its budget)."""
        budget = acts.shape[0] * self.cfg.k
        if self.batch_group.size > 1:
            return (acts >= self.batch_group.kth_largest(acts.flatten(), budget * self.batch_group.size)) & (acts > 0)
        top = acts.flatten().topk(budget, sorted=False).indices
        keep = torch.zeros(acts.numel(), dtype=torch.bool, device=acts.device)
        return keep.index_fill_(0, top, True).view_as(acts)

    def _update_threshold(self, selected: Tensor) -> None:
        """``θ ← β θ + (1 − β) min{selected > 0}`` (``θ ← min`` on the first batch), the minimum
        taken over the whole batch (every rank of ``batch_group``)."""
        positive = selected[selected > 0]
        smallest = positive.min() if positive.numel() else selected.new_full((), math.inf)
        smallest = self.batch_group.min(smallest)
        if not math.isfinite(smallest):
            return
        if self.threshold == 0:
            self.threshold.copy_(smallest)
        else:
            self.threshold.lerp_(smallest, 1 - self.threshold_decay)


def pack_rows(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Column ids of each row's True entries, left-aligned: ``indices, valid: [T, K_max]``.

    ``K_max`` is the largest count in a row (at least 1); padding has index 0 and ``valid`` False.
    """
    rows, cols = mask.nonzero(as_tuple=True)  # row-major, so each row's entries are contiguous
    counts = torch.bincount(rows, minlength=mask.shape[0])
    width = max(int(counts.max()), 1) if rows.numel() else 1
    slot = torch.arange(rows.numel(), device=mask.device) - (counts.cumsum(0) - counts)[rows]
    indices = torch.zeros(mask.shape[0], width, dtype=torch.long, device=mask.device)
    valid = torch.zeros(mask.shape[0], width, dtype=torch.bool, device=mask.device)
    indices[rows, slot] = cols
    valid[rows, slot] = True
    return indices, valid
