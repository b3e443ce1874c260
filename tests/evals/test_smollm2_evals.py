"""Both evals end to end on the real embedded SmolLM2-135M (layer 10 resid_post): a small TopK SAE
trained on its activations, probed on real labelled text and scored for absorption (slow)."""
from __future__ import annotations

import json

import pytest

from switchsae.cli import main
from tiny_lm import WIKI

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_run(tmp_path_factory):
    """A TopK SAE (512 latents, k = 16) trained 20 steps on 20k real activations."""
    folder = tmp_path_factory.mktemp("smollm2_evals")
    main(["cache", "--model", "smollm2-135m", "--layer", "10", "--corpus", str(WIKI), "--tokens", "20000",
          "--out", str(folder / "cache"), "--quiet"])
    main(["train", "--acts", str(folder / "cache"), "--arch", "topk", "--width", "512", "--k", "16", "--steps", "20",
          "--batch-size", "512", "--normalize", "--out", str(folder / "run"), "--quiet"])
    return folder


def test_probe_reads_topics_from_the_model_and_from_the_cache(smollm2_run, tmp_path):
    for extra in ([], ["--acts", str(smollm2_run / "cache")]):
        out = tmp_path / "probe.json"
        main(["probe", str(smollm2_run / "run"), "--task", "wiki-topic", "--data", str(WIKI), "--docs-per-class", "10",
              "--max-classes", "2", "--seeds", "1", "--out", str(out), "--quiet", *extra])
        result = json.loads(out.read_text())
        # the whole file's two largest topics; the cache's 20k tokens hold its first ~150 articles only
        assert result["classes"][0] == "People" and len(result["classes"]) == 2 and result["documents"] == 20
        assert 0.5 <= sum(result["features"]["run"]["accuracy"]["all"]) <= 1.0


def test_absorption_on_the_real_vocabulary(smollm2_run, tmp_path):
    out = tmp_path / "absorption.json"
    main(["absorption", str(smollm2_run / "run"), "--words", "400", "--out", str(out), "--quiet"])
    result = json.loads(out.read_text())
    assert result["train_words"] == 320 and result["test_words"] == 80
    scores = result["saes"]["run"]
    for key in ("mean_absorption_fraction", "mean_full_absorption_rate"):
        assert scores[key] is None or 0.0 <= scores[key] <= 1.0
