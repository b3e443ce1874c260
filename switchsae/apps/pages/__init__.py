"""The feature pages: a static site (plain HTML/CSS/JS in ``static/``) plus its data, in one folder.

Layout of a pages folder::

    index.html app.js style.css      the site (index and feature views, hash-routed: #f=ID)
    data/meta.js                     run, cache and settings; written last, marks a finished folder
    data/index.js                    columns for the index: id, expert, density, max, top, boost
    data/vocab.js                    {token id: text} for every token the pages show
    data/features_NNN.js             records (see switchsae.apps.records), CHUNK per file, by id

Each data file is one JSON document wrapped as ``SWITCHSAE.put("NAME", JSON);`` so that pages
opened from ``file://`` can load it with ``<script src>`` (browsers refuse ``fetch`` there);
:func:`read_data` unwraps it. Chunks are loaded when a feature is opened, so the index of 16,384
features loads one small file, and the index renders one page of rows at a time.
"""
from __future__ import annotations

import json
import shutil
from importlib import resources
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator

from switchsae.apps.records import index_entry, used_tokens

CHUNK = 256
META, INDEX, VOCAB = "meta", "index", "vocab"
SITE_FILES = ("index.html", "app.js", "style.css")
_PREFIX = "SWITCHSAE.put("


def chunk_name(chunk: int) -> str:
    """Name of the data file holding records ``[chunk·CHUNK, (chunk+1)·CHUNK)``."""
    return f"features_{chunk:03d}"


def _write_data(folder: Path, name: str, data) -> None:
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    (folder / "data" / f"{name}.js").write_text(f"{_PREFIX}{json.dumps(name)},{text});\n", encoding="utf-8")


def read_data(folder: str | Path, name: str):
    """The JSON document in ``folder/data/NAME.js``."""
    text = (Path(folder) / "data" / f"{name}.js").read_text(encoding="utf-8")
    if not text.startswith(_PREFIX):
        raise ValueError(f"{folder}/data/{name}.js is not a feature-pages data file.")
    decoder = json.JSONDecoder()
    _, end = decoder.raw_decode(text, len(_PREFIX))
    return decoder.raw_decode(text, end + 1)[0]


def is_pages(folder: str | Path) -> bool:
    """Whether ``folder`` holds finished feature pages."""
    return (Path(folder) / "data" / f"{META}.js").is_file()


def load_record(folder: str | Path, feature: int) -> dict:
    """The record of latent ``feature`` from the pages in ``folder``."""
    ids = read_data(folder, INDEX)["id"]
    try:
        position = ids.index(feature)
    except ValueError:
        raise ValueError(f"Feature {feature} is not in the pages in {folder}.") from None
    return read_data(folder, chunk_name(position // CHUNK))[position % CHUNK]


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def write_site(out: str | Path, meta: dict, records: Iterable[dict], token_text: Callable[[list[int]], list[str]]) -> Path:
    """Write the pages of ``records`` (in id order, streamed: CHUNK at a time in memory) into ``out``;
    ``token_text`` turns token ids into the text shown. Earlier pages in ``out`` are replaced; a
    folder holding anything else is refused. The site is built beside ``out`` and moved into
    place, so ``out`` is never half written."""
    out = Path(out)
    if out.exists() and not is_pages(out) and any(out.iterdir()):
        raise ValueError(f"{out} already holds files that are not feature pages; choose an empty or new folder.")
    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "data").mkdir(parents=True)
    static = resources.files(__package__) / "static"
    for name in SITE_FILES:
        (staging / name).write_bytes((static / name).read_bytes())
    index: dict[str, list] = {}
    tokens: set[int] = set()
    for number, chunk in enumerate(_chunks(records, CHUNK)):
        _write_data(staging, chunk_name(number), chunk)
        for record in chunk:
            for column, value in index_entry(record).items():
                index.setdefault(column, []).append(value)
            tokens |= used_tokens(record)
    if not index:
        raise ValueError("There are no feature records to write.")
    ids = sorted(tokens)
    _write_data(staging, INDEX, index)
    _write_data(staging, VOCAB, dict(zip(map(str, ids), token_text(ids))))
    _write_data(staging, META, {**meta, "features": len(index["id"]), "chunk": CHUNK})
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return out


def how_to_open(folder: str | Path) -> str:
    """Two ways to open the pages in ``folder``: the file URL and the ``switchsae serve`` command."""
    folder = Path(folder).resolve()
    return f"open {(folder / 'index.html').as_uri()} in a browser, or run: switchsae serve {folder}"


def site_bytes(folder: str | Path) -> int:
    """Total size of the files in a pages folder."""
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())
