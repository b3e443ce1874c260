"""Shared fixtures: a tiny trained tokenizer, a tiny model folder and a small real corpus."""
from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from tiny_lm import tiny_model, wiki_texts


@pytest.fixture(autouse=True)
def one_thread():
    """Run each test on one thread: tiny models gain nothing from more, and on a busy machine
    every extra thread makes each small op wait for a descheduled peer."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with 400 tokens, trained in a blink on a few summaries."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(wiki_texts(300), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>")


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny Llama and its tokenizer saved as a local model folder, for load_model and build_cache."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def wiki_corpus(tmp_path_factory) -> Path:
    """A .jsonl corpus of 200 real Wikipedia summaries."""
    path = tmp_path_factory.mktemp("corpus") / "wiki.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in wiki_texts(200)))
    return path
