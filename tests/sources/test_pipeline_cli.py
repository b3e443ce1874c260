"""The command line over the real-model half: cache → train → eval with loss recovered (tiny Llama)."""
from __future__ import annotations

import json

import pytest
import torch

from switchsae.cli import main
from switchsae.config import RoutingConfig, SAEConfig
from switchsae.pipeline import lm_metrics
from switchsae.saes import build_sae
from switchsae.saes.io import CFG_FILE
from switchsae.sources.cache import ActivationCache


@pytest.fixture
def cache_dir(tmp_path, llama_dir, wiki_corpus):
    out = tmp_path / "cache"
    main(["cache", "--model", str(llama_dir), "--layer", "1", "--site", "resid_post", "--corpus", str(wiki_corpus),
          "--tokens", "6000", "--context-length", "32", "--out", str(out), "--quiet"])
    return out


def test_cache_train_eval_with_loss_recovered(tmp_path, cache_dir, llama_dir):
    run = tmp_path / "run"
    main(["train", "--acts", str(cache_dir), "--arch", "switch", "--width", "64", "--k", "4", "--experts", "2",
          "--steps", "20", "--batch-size", "256", "--normalize", "--out", str(run), "--quiet"])
    cfg = json.loads((run / CFG_FILE).read_text())
    assert (cfg["model_name"], cfg["hook_name"]) == (str(llama_dir), "blocks.1.hook_resid_post")
    main(["eval", str(run), "--acts", str(cache_dir), "--loss-recovered", "--eval-tokens", "256", "--quiet"])
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("ce_clean", "ce_sae", "ce_zero", "loss_recovered", "kl_sae", "fvu", "l0"):
        assert key in metrics
    assert metrics["kl_sae"] >= 0 and metrics["n_predictions"] > 0


def test_loss_recovered_measures_an_sae_in_training_mode_as_at_inference(cache_dir):
    """Expert choice leaves tokens unrouted in training (capacity 0.5: half of them) and BatchTopK
    selects per batch and moves its threshold there; spliced into the model for loss recovered,
    both must run as at inference, and come back in the mode they were handed over in."""
    cache = ActivationCache(cache_dir)
    x = cache.read(0, 512)
    for cfg in (SAEConfig(arch="switch", d_model=cache.d_model, width=64, k=4, n_experts=2,
                          routing=RoutingConfig(router="expert_choice", capacity_factor=0.5)),
                SAEConfig(arch="batchtopk", d_model=cache.d_model, width=64, k=4)):
        sae = build_sae(cfg)
        sae.init_from_data(x)
        sae(x)  # a training-mode forward (BatchTopK: sets its threshold)
        before = {name: value.clone() for name, value in sae.state_dict().items()}
        trained_mode = lm_metrics(sae, cache, 256, progress=False)
        assert sae.training, cfg.arch
        assert all(torch.equal(value, before[name]) for name, value in sae.state_dict().items()), cfg.arch
        sae.eval()
        assert trained_mode == lm_metrics(sae, cache, 256, progress=False), cfg.arch


def test_eval_refuses_a_model_other_than_the_cache_s(tmp_path, cache_dir, capsys):
    run = tmp_path / "run"
    main(["train", "--acts", str(cache_dir), "--arch", "topk", "--width", "64", "--k", "4", "--steps", "2",
          "--batch-size", "256", "--out", str(run), "--quiet"])
    with pytest.raises(SystemExit):
        main(["eval", str(run), "--acts", str(cache_dir), "--loss-recovered", "--model", "smollm2-135m", "--quiet"])
    assert "does not match" in capsys.readouterr().err


def test_cache_rejects_bad_hooks(tmp_path, llama_dir, wiki_corpus, capsys):
    for layer, message in (("7", "out of range"), ("-1", "")):
        with pytest.raises(SystemExit):
            main(["cache", "--model", str(llama_dir), "--layer", layer, "--corpus", str(wiki_corpus),
                  "--tokens", "100", "--out", str(tmp_path / "c"), "--quiet"])
        assert message in capsys.readouterr().err


def test_quiet_also_hides_the_model_loaders_progress_bar(tmp_path, llama_dir, wiki_corpus, capsys):
    from transformers.utils import logging as hf_logging

    try:
        main(["cache", "--model", str(llama_dir), "--layer", "1", "--corpus", str(wiki_corpus),
              "--tokens", "500", "--context-length", "32", "--out", str(tmp_path / "c"), "--quiet"])
        assert "Loading weights" not in capsys.readouterr().err
    finally:
        hf_logging.enable_progress_bar()
