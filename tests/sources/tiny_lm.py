"""Helpers for the source tests: real text from shared/data and tiny random models of each family."""
from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, GPT2Config, GPTNeoXConfig, LlamaConfig

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
WIKI = DATA / "wikipedia_vital4_en.jsonl"
GUTENBERG = DATA / "gutenberg"


def wiki_texts(n: int) -> list[str]:
    """The first ``n`` Wikipedia summaries of the shared data."""
    with WIKI.open(encoding="utf-8") as handle:
        return [json.loads(line)["text"] for line in islice(handle, n)]


def tiny_config(family: str, vocab: int):
    """The config of a 3-layer, 32-wide random model of ``family``."""
    common = dict(vocab_size=vocab, num_hidden_layers=3, num_attention_heads=4)
    if family == "llama":
        return LlamaConfig(hidden_size=32, intermediate_size=64, num_key_value_heads=2,
                           max_position_embeddings=256, **common)
    if family == "gemma3":
        return Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_key_value_heads=2, head_dim=8,
                                max_position_embeddings=256, sliding_window=8, **common)
    if family.startswith("neox"):
        return GPTNeoXConfig(hidden_size=32, intermediate_size=64, max_position_embeddings=256,
                             use_parallel_residual=family == "neox-parallel", **common)
    if family == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=32, n_layer=3, n_head=4, n_positions=256)
    raise ValueError(f"No tiny config for model family '{family}'.")


FAMILIES = ("llama", "gemma3", "gpt2", "neox", "neox-parallel")


def tiny_model(family: str, vocab: int, seed: int = 0):
    """A seeded random model of ``family`` in eval mode with gradients off."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, vocab))
    return model.eval().requires_grad_(False)
