"""End to end on the real embedded SmolLM2-135M: layer 10 resid_post over real Wikipedia text.

The first run converts the GGUF once (~20 s) into the user's model cache; later runs take seconds.
"""
from __future__ import annotations

import pytest
import torch

from switchsae.lm_eval import loss_recovered
from switchsae.sources.cache import ActivationCache, build_cache
from switchsae.sources.hooks import HookPoint, capture
from switchsae.sources.models import load_model
from switchsae.sources.text import take_windows
from tiny_lm import WIKI

HOOK = HookPoint(10, "resid_post")


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


def test_activations_look_like_the_spec_says(smollm2):
    model, tokenizer = smollm2
    windows = take_windows(tokenizer, WIKI, 64, 4)
    acts = capture(model, HOOK, windows)
    assert acts.shape == (4, 64, 576) and acts.dtype == torch.float32
    norms = acts.norm(dim=-1)
    assert 80 < norms[:, 1:].mean() < 250  # SPEC 2b: mean row norm ~142
    assert norms[:, 0].mean() > norms[:, 1:].mean()  # the attention sink is larger still
    result = loss_recovered(model, HOOK, lambda x, ids: x, windows)
    assert 1.0 < result["ce_clean"] < 5.0
    assert result["loss_recovered"] == pytest.approx(1.0, abs=1e-4) and result["kl_sae"] < 1e-6


def test_cache_of_real_activations(smollm2, tmp_path):
    out = build_cache("smollm2-135m", HOOK, WIKI, 630, tmp_path / "acts", context_length=64,
                      batch_size=5, progress=False)
    cache = ActivationCache(out, verify=True)
    assert cache.manifest["tokenizer"]["vocab_size"] == 49152 and cache.n_tokens == 630
    model, tokenizer = smollm2
    expected = capture(model, HOOK, take_windows(tokenizer, WIKI, 64, 10))[:, 1:].reshape(-1, 576)
    held_out = torch.cat(list(cache.eval_batches(64)))
    torch.testing.assert_close(held_out, expected[-held_out.shape[0]:].bfloat16().float())
