"""Loss recovered by patching a reconstruction into the model."""
from __future__ import annotations

import math

import pytest
import torch

from switchsae.lm_eval import loss_recovered
from switchsae.sources.hooks import HookPoint
from switchsae.sources.text import take_windows
from tiny_lm import tiny_model

HOOK = HookPoint(1, "resid_post")


@pytest.fixture(scope="module")
def setup(tokenizer, wiki_corpus):
    return tiny_model("llama", len(tokenizer)), take_windows(tokenizer, wiki_corpus, 24, 6)


def test_identity_recovers_everything(setup):
    model, windows = setup
    result = loss_recovered(model, HOOK, lambda x, ids: x, windows, batch_size=4)
    assert result["ce_sae"] == pytest.approx(result["ce_clean"], abs=1e-6)
    assert result["loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert result["kl_sae"] == pytest.approx(0.0, abs=1e-6)
    assert result["kl_zero"] > 0 and result["ce_zero"] != result["ce_clean"]
    assert result["n_predictions"] == 6 * 22  # positions 1..22 predict tokens 2..23


def test_zero_reconstruction_recovers_nothing(setup):
    model, windows = setup
    result = loss_recovered(model, HOOK, lambda x, ids: torch.zeros_like(x), windows)
    assert result["loss_recovered"] == pytest.approx(0.0, abs=1e-6)
    assert result["kl_sae"] == pytest.approx(result["kl_zero"])


def test_first_position_stays_clean(setup):
    model, windows = setup
    seen = []

    def record(rows, ids):
        seen.append(rows.shape)
        assert rows.dtype == torch.float32
        assert ids.tolist() == windows[:, 1:].reshape(-1).tolist()  # each row's own token id
        return rows
    loss_recovered(model, HOOK, record, windows, batch_size=6, drop_first=1)
    assert seen == [torch.Size([6 * 23, 32])]
    result = loss_recovered(model, HOOK, lambda x, ids: x + 1.0, windows, drop_first=0)
    assert not math.isnan(result["loss_recovered"]) and result["n_predictions"] == 6 * 23


def test_windows_must_be_two_dimensional(setup):
    model, windows = setup
    with pytest.raises(ValueError, match="windows must be \\[n, seq\\] token ids"):
        loss_recovered(model, HOOK, lambda x, ids: x, windows[0])
