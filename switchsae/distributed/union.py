"""Several entries per token across ranks: one TopK over the union of a token's experts, at its home.

With top-e routing, a shared expert or expert choice a token ``t`` has entries in several experts
``E_t``, possibly on different ranks, and its code is one TopK over all of their latents
(SwitchSAE's docstring): ``S_t = TopK_{j ∈ ∪_{e ∈ E_t} e} v_tj``, ``v_tj = W_enc[j]·(x_t − b_pre)``,
``z_tj = g_{e(j)} ReLU(v_tj)``, ``x̂_t = b_pre + Σ_{j ∈ S_t} z_tj W_dec[j]``. Each expert's
share of ``S_t`` is among its own ``k`` largest, so (exchange.py moves the rows):

1. each owner computes its entries' ``k`` largest pre-activations (the same selection as one
   process) and sends the candidates home: ``k`` values and ``k`` ids per entry (``12k`` bytes);
2. the home takes the TopK over each token's candidates (kernels/dispatch.py's ``union_slots``,
   the function one process uses) and tells each owner which of its candidates won (``k``
   bytes per entry);
3. each owner encodes the winners (``z``, differentiable in ``W_enc``, ``b_pre``, the gate) and
   decodes them into a partial reconstruction ``Σ_{j ∈ S_t ∩ e} z_tj W_dec[j]`` per entry, and
   sends ``z`` and the partial home (``4(k + d)`` bytes per entry);
4. the home adds ``b_pre`` and its entries' partials, and computes the squared error of its own
   tokens.

The backward retraces the last exchange (``∂L/∂partial = ∂L/∂x̂_t`` of the entry's token, ``∂L/∂z``)
and the dispatch (``∂L/∂gate``); expert gradients stay on the owners. The result is one
process's, with one convention kept: one process pads a token with fewer than ``k`` candidates
(expert choice leaves tokens unrouted; AuxK may find few dead latents) with latent 0 at value 0,
which puts a zero row 0 into row-sparse gradients, so the owner of latent 0 adds such a zero
reference whenever any rank padded (one flag all-reduced per exchange, with whether any
candidate exists at all).

AuxK (:func:`auxk_loss`) is the same exchange with other candidates: the owner's ``k_aux``
largest pre-activations among the dead latents of each entry's expert (dead counters are kept
for every latent on every rank, identical, so the owner reads its experts' part), gate 1, no
bias, and the home's loss ``‖r_t − ê_t‖²`` against its residual.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from switchsae.distributed.exchange import Dispatched
from switchsae.kernels.dispatch import union_slots
from switchsae.kernels.sparse import sparse_decode, topk_encode
from switchsae.saes.base import Latents, SAEOutput

if TYPE_CHECKING:
    from switchsae.distributed.expert_parallel import ExpertParallel
    from switchsae.saes.switch import SwitchSAE


@dataclass
class Winners:
    """The home's TopK over its tokens' candidates and what the owners learn of it.

    Home: ``entry, slot, valid: [T, k]`` (the entry and candidate slot of each chosen latent),
    ``ids: [T, k]`` their global latent ids (0 where not valid). Owner: ``keep: [R, c]`` which of
    its rows' candidates won. ``padded``: some token on some rank has fewer than ``k`` candidates;
    ``found``: some token on some rank has one.
    """

    entry: Tensor
    slot: Tensor
    valid: Tensor
    ids: Tensor
    keep: Tensor
    padded: bool
    found: bool


def forward(sae: SwitchSAE, ep: ExpertParallel, sent: Dispatched, x: Tensor,
            decode: bool) -> tuple[Latents, Tensor | None, Tensor | None]:
    """The code (global ids, token order), ``x̂`` (raw units) and the home's share of the squared
    error of normalised ``x``, for entries dispatched to their owners (steps 1-4 above)."""
    values, local_ids, centred = sae.select_candidates(sent.x, sent.counts)
    won = winners(sae, ep, sent, values, local_ids, sae.cfg.k)
    z, decoded = encode_winners(sae, ep, sent, won, values, local_ids, centred, sent.x, sent.gate, decode)
    latents = Latents(z, won.ids)
    if not decode:
        return latents, None, None
    assert decoded is not None  # decode=True reconstructs
    x_hat = sae.b_pre + decoded
    mse = (x_hat - x).pow(2).sum() / max(x.shape[0], 1)
    return latents, x_hat * (1 / sae.cfg.act_scale), mse


def winners(sae: SwitchSAE, ep: ExpertParallel, sent: Dispatched, values: Tensor, local_ids: Tensor,
            k: int) -> Winners:
    """Steps 1-2: the owners' candidates (``values, local_ids: [R, c]``, -inf for none) to their
    homes, the TopK of each token there, and the winning candidates back to the owners."""
    home_values, home_ids = sent.to_homes([values, ep.global_ids(local_ids)])
    _, entry, slot, valid = union_slots(home_values, sent.token, sent.n_tokens, k)
    width = values.shape[1]
    chosen = (entry * width + slot).view(-1)
    keep = torch.zeros(home_values.numel(), dtype=torch.bool, device=values.device)
    keep[chosen[valid.view(-1)]] = True
    owner_keep = sent.to_owners([keep.view(home_values.shape)])[0]
    ids = _pick(home_ids, chosen, valid)
    padded, found = sae.batch_group.any(torch.stack([(~valid).any(), valid.any()])).tolist()
    return Winners(entry, slot, valid, ids, owner_keep, bool(padded), bool(found))


def encode_winners(sae: SwitchSAE, ep: ExpertParallel, sent: Dispatched, won: Winners, values: Tensor,
                   local_ids: Tensor, centred: Tensor, x_rows: Tensor, gate: Tensor | None,
                   decode: bool) -> tuple[Tensor, Tensor | None]:
    """Steps 3-4: ``z: [T, k]`` of the home's code (0 where not valid) and, with ``decode``, the sum
    of its entries' partial reconstructions ``[T, d]`` (no bias), both differentiable.

    An owner's row encodes only its winning candidates: the others point at the row's first
    winner with value and weight 0 (a row no winner uses is left out), so row-sparse gradients
    touch exactly the winning latents, as in one process."""
    keep = won.keep
    rows = keep.any(1).nonzero().squeeze(1)
    first = local_ids.gather(1, keep.long().argmax(1, keepdim=True))
    ids = torch.where(keep, local_ids, first).index_select(0, rows)
    vals = torch.where(keep, values, 0.0).index_select(0, rows)
    weight = keep.index_select(0, rows).to(values.dtype)
    if gate is not None:
        weight = weight * gate.index_select(0, rows)[:, None]
    x_rows, centred = x_rows.index_select(0, rows), centred.index_select(0, rows)
    pad = int(won.padded and sae.sparse_grads and ep.group.rank == 0)  # latent 0 lives on rank 0
    if pad:  # one process's padding: a zero reference to latent 0
        ids, vals, weight, x_rows, centred = (torch.cat([t, t.new_zeros((1, *t.shape[1:]))])
                                              for t in (ids, vals, weight, x_rows, centred))
    z = topk_encode(x_rows, sae.b_pre, sae.W_enc, ids, vals, sae.sparse_grads, centred) * weight
    parts = [z]
    if decode:
        parts.append(sparse_decode(z, ids, sae.W_dec, sae.sparse_grads))
    n_rows = keep.shape[0]
    parts = [p[:p.shape[0] - pad] for p in parts]
    parts = [p.new_zeros((n_rows, *p.shape[1:])).index_copy(0, rows, p) for p in parts]
    home = sent.to_homes(parts, differentiable=True)
    chosen = (won.entry * keep.shape[1] + won.slot).view(-1)
    code = _pick(home[0], chosen, won.valid)
    if not decode:
        return code, None
    decoded = home[1].new_zeros((sent.n_tokens, home[1].shape[1])).index_add(0, sent.token, home[1])
    return code, decoded


def _pick(per_entry: Tensor, chosen: Tensor, valid: Tensor) -> Tensor:
    """``per_entry.flatten()[chosen]`` where ``valid``, else 0, ``[T, k]`` (also when the home has
    no entries: the invalid slots read an appended zero)."""
    flat = torch.cat([per_entry.reshape(-1), per_entry.new_zeros(1)])
    return flat.index_select(0, torch.where(valid.view(-1), chosen, per_entry.numel())).view(valid.shape)


def auxk_loss(sae: SwitchSAE, ep: ExpertParallel, sent: Dispatched, x: Tensor, out: SAEOutput,
              dead: Tensor) -> Tensor:
    """saes/auxk.py's ``auxk_coeff · L_auxk`` with the experts on their owners: candidates among
    each entry's expert's dead latents, the union TopK at home, ``ê`` from the owners' partials."""
    cfg = sae.cfg
    scale = cfg.act_scale
    with torch.no_grad():
        residual = x.float() * scale - out.x_hat.detach() * scale
        rows = sent.x.detach()
        centred = rows - sae.b_pre
    values, local_ids = dead_candidates(sae, ep, sent.counts, centred, dead)
    won = winners(sae, ep, sent, values, local_ids, cfg.auxk_k)
    if not won.found:  # as one process: no token reaches a dead latent anywhere
        return x.new_zeros(())
    _, e_hat = encode_winners(sae, ep, sent, won, values, local_ids, centred, rows, None, decode=True)
    assert e_hat is not None  # decode=True reconstructs
    weight = cfg.auxk_coeff * min(1.0, int(dead.sum()) / cfg.auxk_k)
    return weight * (residual - e_hat).pow(2).sum(-1).mean()


def dead_candidates(sae: SwitchSAE, ep: ExpertParallel, counts: list[int], centred: Tensor,
                    dead: Tensor) -> tuple[Tensor, Tensor]:
    """Each owner row's ``k_aux`` largest pre-activations among its block's dead latents
    (``[R, k_aux]`` values, -inf where the block has fewer, and ids into the rows held here)."""
    k_aux, m = sae.cfg.auxk_k, sae.cfg.expert_width
    values = centred.new_full((centred.shape[0], k_aux), float("-inf"))
    ids = torch.zeros((centred.shape[0], k_aux), dtype=torch.long, device=centred.device)
    start = 0
    for block, count in enumerate(counts):
        latents = torch.arange(block * m, (block + 1) * m, device=centred.device)
        dead_ids = latents[dead[ep.global_ids(latents)]]
        if count and dead_ids.numel():
            with torch.no_grad():
                pre = centred[start:start + count] @ sae.W_enc[dead_ids].t()
                top, where = pre.topk(min(k_aux, dead_ids.numel()), dim=-1, sorted=False)
            values[start:start + count, :top.shape[1]] = top
            ids[start:start + count, :top.shape[1]] = dead_ids[where]
        start += count
    return values, ids
