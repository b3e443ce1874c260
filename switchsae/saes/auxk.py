"""AuxK (Gao et al., 2024): dead latents learn to reconstruct what the live ones miss.

With ``r = x − x̂`` the residual of the normalised input (no gradient; ``x̂`` already holds
``b_pre``, so the bias is counted once) and ``D`` the dead latents (no firing for
``dead_tokens`` training tokens), each token's ``k_aux`` largest dead pre-activations
``v_tj = W_enc[j] · (x_t − b_pre) + b_enc[j]`` (``b_enc`` only where the SAE has one) within its
own experts give

    ê_t = Σ_{j ∈ TopK_aux(D ∩ experts(t))} ReLU(v_tj) W_dec[j]           (no bias)
    L_auxk = min(1, |D| / k_aux) · (1/T) Σ_t ‖r_t − ê_t‖²

in the units of the reconstruction MSE (so its weight means the same with and without
normalisation, as sparsify scales it by the same total variance as its FVU). A TopK SAE is one
expert holding every latent; a Switch SAE passes one group per expert block, the tokens routed
there with that block's latent range, and a token routed to several experts takes one TopK over
the union of their dead candidates (kernels/dispatch.py's ``combine``).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from switchsae.kernels.dispatch import combine
from switchsae.kernels.sparse import sparse_decode, topk_encode


def auxk_loss(sae, x: Tensor, out, dead: Tensor, groups: Sequence[tuple[Tensor, range]]) -> Tensor:
    """``auxk_coeff · L_auxk`` of the module docstring for raw activations ``x`` and the forward's
    output ``out``; ``groups`` are ``(tokens, latent range)`` pairs (an expert and its tokens)."""
    cfg = sae.cfg
    scale = cfg.act_scale
    enc_bias = getattr(sae, "b_enc", None)
    with torch.no_grad():
        x_norm = x.float() * scale
        residual = x_norm - out.x_hat.detach() * scale
        centred = x_norm - sae.b_pre
    tokens, values, indices = [], [], []
    for group_tokens, latents in groups:
        dead_ids = dead[latents.start:latents.stop].nonzero().squeeze(1) + latents.start
        if group_tokens.numel() == 0 or dead_ids.numel() == 0:
            continue
        with torch.no_grad():
            pre = centred.index_select(0, group_tokens) @ sae.W_enc[dead_ids].t()
            if enc_bias is not None:
                pre += enc_bias[dead_ids]
            top, where = pre.topk(min(cfg.auxk_k, dead_ids.numel()), dim=-1, sorted=False)
        pad = cfg.auxk_k - top.shape[1]
        tokens.append(group_tokens)
        values.append(torch.nn.functional.pad(top, (0, pad), value=float("-inf")))
        indices.append(torch.nn.functional.pad(dead_ids[where], (0, pad)))
    if not tokens:
        return x.new_zeros(())
    token = torch.cat(tokens)
    v, i, gate = combine(torch.cat(values), torch.cat(indices), torch.ones(token.numel(), device=x.device), token,
                         x.shape[0], cfg.auxk_k)
    z = topk_encode(x_norm, sae.b_pre, sae.W_enc, i, v, sae.sparse_grads, centred, enc_bias) * gate
    e_hat = sparse_decode(z, i, sae.W_dec, sae.sparse_grads)
    weight = cfg.auxk_coeff * min(1.0, int(dead.sum()) / cfg.auxk_k)
    return weight * (residual - e_hat).pow(2).sum(-1).mean()
