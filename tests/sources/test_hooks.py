"""Hook points: naming, module resolution per family, early-stopped capture, patching."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from tiny_lm import FAMILIES, tiny_model
from switchsae.sources.hooks import SITES, HookPoint, capture, decoder_layers, patched, resolve

VOCAB = 400


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return tiny_model(request.param, VOCAB)


def ids(batch: int = 2, seq: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))


def test_names_round_trip():
    for site in SITES:
        hook = HookPoint(10, site)
        assert hook.name == f"blocks.10.hook_{site}"
        assert HookPoint.parse(hook.name) == hook


@pytest.mark.parametrize("bad", ["blocks.1.hook_resid", "layer.1.resid_post", "blocks.x.hook_mlp_out"])
def test_bad_names_are_refused(bad):
    with pytest.raises(ValueError, match="hook"):
        HookPoint.parse(bad)


def test_unknown_site_and_negative_layer():
    with pytest.raises(ValueError, match="Unknown hook site 'resid_mid'"):
        HookPoint(1, "resid_mid")
    with pytest.raises(ValueError, match="non-negative"):
        HookPoint(-1, "resid_post")


def test_layer_out_of_range_names_the_valid_range(model):
    with pytest.raises(ValueError, match="has layers 0 to 2"):
        resolve(model, HookPoint(3, "resid_post"))


def test_unsupported_architecture():
    with pytest.raises(ValueError, match="Unsupported architecture Sequential"):
        resolve(nn.Sequential(nn.Linear(2, 2)), "blocks.0.hook_resid_post")


def test_residual_captures_match_hidden_states(model):
    tokens = ids()
    hidden = model(tokens, output_hidden_states=True).hidden_states
    for layer in range(2):  # the last entry of hidden_states has the final norm applied
        torch.testing.assert_close(capture(model, HookPoint(layer, "resid_post"), tokens), hidden[layer + 1])
        torch.testing.assert_close(capture(model, HookPoint(layer, "resid_pre"), tokens), hidden[layer])


def test_sub_block_outputs_sum_to_the_residual_update(model):
    tokens = ids()
    grab = {site: capture(model, HookPoint(1, site), tokens) for site in SITES}
    torch.testing.assert_close(grab["resid_pre"] + grab["attn_out"] + grab["mlp_out"], grab["resid_post"])


@pytest.mark.parametrize("site", SITES)
def test_capture_stops_after_the_hooked_module(model, site):
    later = [decoder_layers(model)[2], model.get_output_embeddings()]
    calls = []
    handles = [module.register_forward_pre_hook(lambda *_: calls.append(1)) for module in later]
    try:
        act = capture(model, HookPoint(1, site), ids())
    finally:
        for handle in handles:
            handle.remove()
    assert act.shape == (2, 12, 32)
    assert calls == []


@pytest.mark.parametrize("site", SITES)
def test_patching(model, site):
    tokens = ids()
    clean = model(tokens).logits
    with patched(model, HookPoint(1, site), lambda act: act):
        torch.testing.assert_close(model(tokens).logits, clean)
    with patched(model, HookPoint(1, site), torch.zeros_like):
        assert not torch.allclose(model(tokens).logits, clean)
    torch.testing.assert_close(model(tokens).logits, clean)  # the hook is gone again
