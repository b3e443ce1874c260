"""Labelled documents read from an activation cache instead of a fresh pass of the model.

A cache (``switchsae cache``) stores, with every activation row, the token it belongs to; its
windows cut one stream of corpus documents, each followed by a separator
(:func:`switchsae.analysis.specialisation.document_of_rows` maps rows back to documents). For a
cache of the task's own corpus this gives each document's activations at no model cost:

- ``wiki-topic``: a cache of ``wiki-vital`` (or of the jsonl file itself), whose documents are the
  jsonl's articles in its order (both sorted by title); each article's label is its ``topic``;
- ``gutenberg-author``: a cache of the Gutenberg folder, whose documents are its ``.txt`` files in
  sorted order; a book's label is its author (file-name prefix before ``__``).

Documents are runs of consecutive rows of one corpus document, separator rows left out, at most
``context_length − 1`` rows (SAEBench's context of 128 tokens minus BOS): a Wikipedia article
gives its first such run (SAEBench truncates), a book every full run of ``context_length − 1``
rows (its chunks). The difference from a fresh pass: a document's first tokens may see the end of
the previous document in the same window, as they did when the SAE was trained.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from switchsae.analysis.specialisation import document_of_rows
from switchsae.evals.documents import DocumentActivations
from switchsae.evals.labelled import EXCLUDED_TOPICS, default_data, select_by_label
from switchsae.sources.cache import ActivationCache


def corpus_labels(cache: ActivationCache, task: str, data: str | Path | None = None) -> list[str | None]:
    """The label of each corpus document of the cache, in corpus order (None: left out)."""
    corpus = str(cache.manifest["corpus"])
    if task == "wiki-topic":
        if corpus != "wiki-vital" and not corpus.endswith(".jsonl"):
            raise ValueError(f"The cache in {cache.path} was built from {corpus}, not from wiki-vital; "
                             f"--task wiki-topic needs a cache of the Wikipedia articles.")
        path = Path(data) if data else (Path(corpus) if corpus.endswith(".jsonl") else default_data(task))
        topics = [json.loads(line).get("topic") for line in path.open(encoding="utf-8") if line.strip()]
        return [None if topic in EXCLUDED_TOPICS else topic for topic in topics]
    if task == "gutenberg-author":
        folder = Path(corpus)
        if not folder.is_dir():
            raise ValueError(f"The cache in {cache.path} was built from {corpus}, not from a folder of books; "
                             f"--task gutenberg-author needs a cache of the Gutenberg folder.")
        return [path.stem.partition("__")[0] for path in sorted(folder.rglob("*.txt"))]
    raise ValueError(f"Unknown probing task '{task}'.")


def document_runs(cache: ActivationCache, whole_documents: bool, length: int) -> list[tuple[int, int, int]]:
    """``(corpus document, first row, end row)`` of each run of the module doc."""
    manifest = cache.manifest
    separator = manifest["tokenizer"]["eos_token_id"]
    if separator is None:
        separator = manifest["tokenizer"]["bos_token_id"]
    rows = np.arange(cache.n_tokens)
    docs = document_of_rows(cache.windows(), rows, manifest["drop_first"], separator,
                            manifest["tokenizer"]["bos_token_id"] is not None)
    kept = cache.token_ids(rows).numpy() != separator
    starts = np.flatnonzero(np.diff(docs, prepend=-1))
    ends = np.append(starts[1:], cache.n_tokens)
    runs = []
    for start, end in zip(starts.tolist(), ends.tolist()):
        end = start + int(kept[start:end].sum())  # a separator is a document's last row
        if whole_documents:
            runs += [(int(docs[start]), start, min(end, start + length))] if end > start else []
        else:
            runs += [(int(docs[start]), a, a + length) for a in range(start, end - length + 1, length)]
    return runs


def cached_documents(cache: ActivationCache, task: str, docs_per_class: int, max_classes: int,
                     context_length: int = 128, data: str | Path | None = None
                     ) -> tuple[DocumentActivations, torch.Tensor, list[str]]:
    """The task's documents in ``cache`` (module doc), selected as :func:`select_by_label` does:
    their packed activations (bfloat16), class ids and class names."""
    labels = corpus_labels(cache, task, data)
    runs = document_runs(cache, whole_documents=task == "wiki-topic", length=context_length - 1)
    if runs and runs[-1][0] >= len(labels):
        raise ValueError(f"The cache in {cache.path} holds {runs[-1][0] + 1} documents but the labels list "
                         f"only {len(labels)}: it was not built from this task's corpus.")
    runs = [run for run in runs if labels[run[0]] is not None]
    chosen, ids, classes = select_by_label([str(labels[run[0]]) for run in runs], docs_per_class, max_classes,
                                           source=f"{task} in the cache {cache.path}")
    picked = [runs[i] for i in chosen]
    acts = torch.cat([cache.read(a, b).to(torch.bfloat16) for _, a, b in picked])
    token_ids = cache.token_ids(np.concatenate([np.arange(a, b) for _, a, b in picked]))
    lengths = torch.tensor([b - a for _, a, b in picked])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    return DocumentActivations(acts, token_ids, offsets), ids, classes
