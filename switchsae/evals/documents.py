"""Documents through the model to a hook, and their activations and SAE codes mean-pooled.

Tokenisation follows the activation cache: BOS (when the tokenizer has one), then the document's
tokens without special tokens, cut to ``context_length`` tokens in all (SAEBench's 128 by default).
The first ``drop_first`` positions (BOS, the attention sink, which the cache and so the SAE never
saw) are left out, as SAEBench masks BOS, padding and EOS.

Mean pooling: with ``T_d`` the kept positions of document ``d`` and ``f(x_t)`` a per-token feature
vector (the activation itself, or an SAE's code ``z(x_t) ∈ R^M``)::

    pooled_d = (1/|T_d|) Σ_{t ∈ T_d} f(x_t)

computed from sparse codes by scatter-adding each token's ``k`` (value, index) pairs into row ``d``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm import tqdm

from switchsae.saes import SparseAutoencoder
from switchsae.sources.hooks import HookPoint, capture


@dataclass
class DocumentActivations:
    """Every kept position of every document, packed: ``acts[offsets[d]:offsets[d+1]]`` is document ``d``'s."""

    acts: Tensor  # [T, d], the storage dtype (bfloat16 by default, as the activation cache)
    token_ids: Tensor  # [T]
    offsets: Tensor  # [D + 1]

    @property
    def n_docs(self) -> int:
        return self.offsets.numel() - 1

    def doc_of_rows(self) -> Tensor:
        """``[T]``: the document of each packed row."""
        return torch.repeat_interleave(torch.arange(self.n_docs), self.offsets.diff())


def document_ids(tokenizer, texts: list[str], context_length: int, drop_first: int = 1) -> list[list[int]]:
    """Each text's ids as the module doc tokenises them; a document with no kept position is refused."""
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    ids = [(bos + tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])[:context_length]
           for text in texts]
    empty = [i for i, row in enumerate(ids) if len(row) <= drop_first]
    if empty:
        raise ValueError(f"Document {empty[0]} has no tokens after the first {drop_first} position(s).")
    return ids


@torch.no_grad()
def document_activations(model: nn.Module, tokenizer, hook: HookPoint | str, texts: list[str], *,
                         context_length: int = 128, drop_first: int = 1, batch_size: int = 16,
                         dtype: torch.dtype = torch.bfloat16, progress: bool = False) -> DocumentActivations:
    """Run every document through ``model`` up to ``hook`` (batches of similar length, right-padded
    and masked) and keep its positions from ``drop_first`` on, in document order."""
    ids = document_ids(tokenizer, texts, context_length, drop_first)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    kept: list[Tensor] = [torch.empty(0)] * len(ids)
    for start in tqdm(range(0, len(order), batch_size), desc="documents", disable=not progress):
        batch = order[start:start + batch_size]
        width = max(len(ids[i]) for i in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            input_ids[row, :len(ids[i])] = torch.tensor(ids[i])
            mask[row, :len(ids[i])] = 1
        act = capture(model, hook, input_ids, mask).float().cpu()
        for row, i in enumerate(batch):
            kept[i] = act[row, drop_first:len(ids[i])].to(dtype)
    lengths = torch.tensor([len(row) - drop_first for row in ids])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    token_ids = torch.tensor([t for row in ids for t in row[drop_first:]], dtype=torch.long)
    return DocumentActivations(torch.cat(kept), token_ids, offsets)


def mean_pool(rows: Tensor, docs: DocumentActivations) -> Tensor:
    """``[D, p]``: the mean of each document's packed rows ``rows: [T, p]``."""
    pooled = torch.zeros(docs.n_docs, rows.shape[1]).index_add_(0, docs.doc_of_rows(), rows.float())
    return pooled / docs.offsets.diff().unsqueeze(1)


@torch.no_grad()
def pooled_codes(sae: SparseAutoencoder, docs: DocumentActivations, batch_size: int = 4096) -> Tensor:
    """``[D, M]``: each document's mean SAE code (module doc), encoded ``batch_size`` rows at a time."""
    sae = sae.eval()
    width = sae.cfg.width
    pooled = torch.zeros(docs.n_docs * width)
    doc_of_rows = docs.doc_of_rows()
    for start in range(0, docs.acts.shape[0], batch_size):
        x = docs.acts[start:start + batch_size].float()
        extra = {"token_ids": docs.token_ids[start:start + batch_size]} if sae.needs_token_ids else {}
        code = sae.encode(x, **extra)
        doc = doc_of_rows[start:start + batch_size]
        if code.indices is None:
            flat = (doc.unsqueeze(1) * width + torch.arange(width)).flatten()
            pooled.index_add_(0, flat, code.values.float().flatten())
        else:
            pooled.index_add_(0, (doc.unsqueeze(1) * width + code.indices).flatten(), code.values.float().flatten())
    return pooled.view(docs.n_docs, width) / docs.offsets.diff().unsqueeze(1)
