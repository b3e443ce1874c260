"""What a feature's decoder direction does, from the weights alone: the output tokens it boosts and
suppresses, and its nearest decoder rows in other experts.

Both are "the n largest inner products of each query row with a key matrix", computed in blocks
of query rows (``BLOCK_ELEMENTS`` products at a time, so no ``[F, M]`` or ``[F, vocab]`` matrix is
ever whole): the block is ranked with a bf16 matmul, the best ``n + RESCORE_MARGIN`` candidates are
rescored exactly in fp32 and the best ``n`` of those kept.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.nn.functional import normalize

BLOCK_ELEMENTS = 2**24
RESCORE_MARGIN = 8


def _blocks(queries: Tensor, keys: Tensor) -> Iterator[tuple[slice, Tensor]]:
    """``(span, queries[span] · keysᵀ)`` block by block, the products in bf16 (for ranking only)."""
    keys_bf16 = keys.bfloat16()
    block = max(1, BLOCK_ELEMENTS // keys.shape[0])
    for start in range(0, queries.shape[0], block):
        span = slice(start, start + block)
        yield span, queries[span].bfloat16() @ keys_bf16.t()


def _rescored(queries: Tensor, keys: Tensor, candidates: Tensor, n: int, largest: bool = True,
              mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The ``n`` best of ``candidates: [Q, C]`` (key ids) by their exact fp32 products with ``queries``."""
    exact = torch.einsum("qd,qcd->qc", queries, keys[candidates])
    if mask is not None:
        exact.masked_fill_(mask.gather(1, candidates), float("-inf"))
    best, pick = exact.topk(n, dim=1, largest=largest)
    return best, candidates.gather(1, pick)


def top_products(queries: Tensor, keys: Tensor, n: int,
                 excluded: Callable[[slice], Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """``(values, indices)``, ``[Q, n]`` each: the ``n`` largest ``queries[q] · keys[i]`` per query, in
    descending order, skipping the keys ``excluded(block)[q - block.start, i]`` marks True."""
    queries, keys = queries.float(), keys.float()
    n, wide = min(n, keys.shape[0]), min(n + RESCORE_MARGIN, keys.shape[0])
    values, indices = [], []
    for span, ranked in _blocks(queries, keys):
        mask = excluded(span) if excluded is not None else None
        if mask is not None:
            ranked.masked_fill_(mask, float("-inf"))
        best, ids = _rescored(queries[span], keys, ranked.topk(wide, dim=1).indices, n, mask=mask)
        values.append(best)
        indices.append(ids)
    return torch.cat(values), torch.cat(indices)


def final_norm(model: nn.Module) -> nn.Module | None:
    """The norm a causal LM applies to the residual stream before its unembedding (Llama/Gemma
    ``norm``, GPT-2 ``ln_f``, GPT-NeoX ``final_layer_norm``), or None if it has none of these."""
    for name in ("norm", "ln_f", "final_layer_norm"):
        module = getattr(model.base_model, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


@torch.no_grad()
def logit_effects(directions: Tensor, model: nn.Module, n: int) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """The ``n`` output tokens each direction ``v = W_dec[j]`` raises and lowers most::

        Δlogits_j = W_U · (norm(v) − norm(0))

    with ``W_U = model.get_output_embeddings().weight`` and ``norm`` the model's final norm (identity
    if it has none): the logit lens of the direction alone. For RMSNorm ``norm(v) = γ ⊙ v·√d/‖v‖``, so
    the ranking is that of ``W_U (γ ⊙ v)``; subtracting ``norm(0)`` removes a LayerNorm's bias, which
    would add the same vector for every feature. Returns ``((boost_values, boost_ids),
    (suppress_values, suppress_ids))``, each ``[F, n]``, suppressions most negative first.
    """
    W_U = model.get_output_embeddings().weight.detach().float()  # type: ignore[operator]  # a transformers model
    norm = final_norm(model)
    v = directions.to(W_U.dtype)
    if norm is not None:
        v = norm(v) - norm(torch.zeros_like(v[:1]))
    wide = min(n + RESCORE_MARGIN, W_U.shape[0])
    high, low = [], []
    for span, ranked in _blocks(v, W_U):  # one product per block serves both ends
        high.append(_rescored(v[span], W_U, ranked.topk(wide, dim=1).indices, n))
        low.append(_rescored(v[span], W_U, ranked.topk(wide, dim=1, largest=False).indices, n, largest=False))
    boost_values, boost_ids = (torch.cat(part) for part in zip(*high))
    suppress_values, suppress_ids = (torch.cat(part) for part in zip(*low))
    return (boost_values, boost_ids), (suppress_values, suppress_ids)


@torch.no_grad()
def nearest_rows(W_dec: Tensor, features: Tensor, group_width: int, n: int) -> tuple[Tensor, Tensor]:
    """For each feature ``j``, the ``n`` decoder rows ``i`` of other groups (``i // g ≠ j // g``,
    ``g = group_width``: an expert's width, or 1 for an SAE without experts) with the largest
    ``cos(W_dec[j], W_dec[i])``. Returns ``(cosines, row ids)``, ``[F, n]`` each."""
    unit = normalize(W_dec.detach().float(), dim=1)
    group = torch.arange(unit.shape[0]) // group_width
    own = group[features]

    def excluded(span: slice) -> Tensor:
        return own[span, None] == group[None, :]

    return top_products(unit[features], unit, n, excluded)
