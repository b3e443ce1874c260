"""Labelled documents for sparse probing, and SAEBench's balanced one-vs-rest tasks on them.

Tasks (each names its labelled text; ``data`` overrides where it is read from):

- ``wiki-topic``: the ``topic`` field of ``wikipedia_vital4_en.jsonl`` (one article summary per
  document; the catch-all topic ``Uncategorized`` is left out, it names no topic);
- ``gutenberg-author``: the books and stories of the ``gutenberg/`` folder, the author being a
  file name's prefix before ``__``; each book's text (hard line wraps undone) is cut at word
  boundaries into documents of about ``chunk_chars`` characters.

Both ship with the project, in ``shared/data`` beside the repository checkout.

Selection: the ``max_classes`` labels with the most documents are the classes, each contributing
``docs_per_class`` documents (evenly spaced over its documents, so a Gutenberg author's come from
all of its books and all parts of each). A corpus with fewer than two labels, or a class with fewer
documents than asked for, is refused. Split (per seed): each class's documents are shuffled and
the first ``test_fraction`` of them held out. The binary task of class ``c`` (SAEBench's one-vs-rest
datasets) takes all of ``c``'s documents of a split as positives and as many documents of the other
classes, drawn at random from that split, as negatives, so every task is balanced in both splits.
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

TASKS = ("wiki-topic", "gutenberg-author")
_DEFAULT_FILES = {"wiki-topic": "wikipedia_vital4_en.jsonl", "gutenberg-author": "gutenberg"}
EXCLUDED_TOPICS = ("Uncategorized",)
MIN_DOCS_PER_CLASS = 10  # at least two held-out documents per class at the default split


def default_data(task: str) -> Path:
    """Where ``task``'s text ships: ``shared/data`` beside the repository checkout."""
    return Path(__file__).resolve().parents[3] / "shared" / "data" / _DEFAULT_FILES[task]


@dataclass
class LabelledDocuments:
    """Documents and their class ids; ``classes[label[i]]`` is document ``i``'s class name."""

    texts: list[str]
    labels: Tensor
    classes: list[str]


def _wiki_topics(path: Path) -> list[tuple[str, str]]:
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if "topic" not in record or "text" not in record:
                raise ValueError(f"Line {number} of {path} has no 'topic' and 'text' fields; "
                                 f"--task wiki-topic needs both.")
            if record["topic"] not in EXCLUDED_TOPICS and record["text"].strip():
                rows.append((record["text"], record["topic"]))
    return rows


def chunk_text(text: str, chunk_chars: int) -> list[str]:
    """``text`` with its whitespace collapsed, cut at word boundaries into pieces of about
    ``chunk_chars`` characters (a last piece under half that is dropped)."""
    words = text.split()
    chunks, current, size = [], [], 0
    for word in words:
        current.append(word)
        size += len(word) + 1
        if size >= chunk_chars:
            chunks.append(" ".join(current))
            current, size = [], 0
    if current and size >= chunk_chars // 2:
        chunks.append(" ".join(current))
    return chunks


def _gutenberg_authors(folder: Path, chunk_chars: int) -> list[tuple[str, str]]:
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder of books; --task gutenberg-author reads "
                         f"<Author>__<title>.txt files.")
    rows: list[tuple[str, str]] = []
    for path in sorted(folder.glob("*.txt")):
        author, sep, _ = path.stem.partition("__")
        if not sep:
            raise ValueError(f"Cannot tell the author of {path.name}: gutenberg-author file names are "
                             f"<Author>__<title>.txt.")
        rows.extend((chunk, author) for chunk in chunk_text(path.read_text(encoding="utf-8"), chunk_chars))
    return rows


def read_task(task: str, data: str | Path | None = None, chunk_chars: int = 600) -> list[tuple[str, str]]:
    """All ``(text, label)`` documents of ``task`` (module doc)."""
    if task not in TASKS:
        raise ValueError(f"Unknown probing task '{task}'; choose one of {', '.join(TASKS)}.")
    path = Path(data) if data is not None else default_data(task)
    if not path.exists():
        raise FileNotFoundError(f"The labelled text of --task {task} is not at {path}; give its location with --data.")
    return _wiki_topics(path) if task == "wiki-topic" else _gutenberg_authors(path, chunk_chars)


def select_by_label(labels: list[str], docs_per_class: int, max_classes: int,
                    source: str = "the corpus") -> tuple[list[int], Tensor, list[str]]:
    """The ``max_classes`` largest classes, ``docs_per_class`` evenly spaced documents each (module
    doc): the chosen documents' indices into ``labels``, their class ids and the class names."""
    if docs_per_class < MIN_DOCS_PER_CLASS:
        raise ValueError(f"docs_per_class must be at least {MIN_DOCS_PER_CLASS}, got {docs_per_class}.")
    by_label: dict[str, list[int]] = defaultdict(list)
    for index, label in enumerate(labels):
        by_label[label].append(index)
    if len(by_label) < 2:
        found = f"only the class '{next(iter(by_label))}'" if by_label else "no labelled documents"
        raise ValueError(f"Labelled corpus {source} has {found}; probing needs at least two classes.")
    classes = sorted(by_label, key=lambda c: (-len(by_label[c]), c))[:max_classes]
    short = [c for c in classes if len(by_label[c]) < docs_per_class]
    if short:
        raise ValueError(f"Too few documents per class in {source}: " + ", ".join(
            f"'{c}' has {len(by_label[c])}" for c in short) + f", fewer than the {docs_per_class} asked for "
            f"(lower --docs-per-class or --max-classes).")
    chosen: list[int] = []
    ids: list[int] = []
    for class_id, name in enumerate(classes):
        members = by_label[name]
        picks = torch.linspace(0, len(members) - 1, docs_per_class).round().long().unique()
        chosen.extend(members[i] for i in picks.tolist())
        ids.extend([class_id] * picks.numel())
    return chosen, torch.tensor(ids), classes


def select_documents(rows: list[tuple[str, str]], docs_per_class: int, max_classes: int,
                     source: str = "the corpus") -> LabelledDocuments:
    """:func:`select_by_label` on ``(text, label)`` rows."""
    chosen, ids, classes = select_by_label([label for _, label in rows], docs_per_class, max_classes, source)
    return LabelledDocuments([rows[i][0] for i in chosen], ids, classes)


@dataclass
class BinaryTask:
    """Class ``label`` against the rest: row indices and boolean targets of both splits."""

    label: int
    train: Tensor
    train_y: Tensor
    test: Tensor
    test_y: Tensor


def _one_vs_rest(labels: Tensor, rows: Tensor, label: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    positives = rows[labels[rows] == label]
    others = rows[labels[rows] != label]
    negatives = others[torch.randperm(others.numel(), generator=generator)[:positives.numel()]]
    return torch.cat([positives, negatives]), torch.cat([torch.ones(positives.numel(), dtype=torch.bool),
                                                          torch.zeros(negatives.numel(), dtype=torch.bool)])


def binary_tasks(labels: Tensor, seed: int, test_fraction: float = 0.2) -> list[BinaryTask]:
    """One balanced one-vs-rest task per class, on a per-class split drawn with ``seed`` (module doc)."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}.")
    generator = torch.Generator().manual_seed(seed)
    train, test = [], []
    for label in labels.unique().tolist():
        rows = (labels == label).nonzero().flatten()
        rows = rows[torch.randperm(rows.numel(), generator=generator)]
        n_test = max(1, round(test_fraction * rows.numel()))
        test.append(rows[:n_test])
        train.append(rows[n_test:])
    train_rows, test_rows = torch.cat(train), torch.cat(test)
    tasks = []
    for label in labels.unique().tolist():
        tr, tr_y = _one_vs_rest(labels, train_rows, label, generator)
        te, te_y = _one_vs_rest(labels, test_rows, label, generator)
        tasks.append(BinaryTask(label, tr, tr_y, te, te_y))
    return tasks
