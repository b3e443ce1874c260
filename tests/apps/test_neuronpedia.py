"""The Neuronpedia / SAEDashboard export of feature pages: read back by SAEDashboard's own data
classes (sae-dashboard 0.8.0 in the SAELens virtualenv, neuronpedia_worker.py), and its numbers
against the records and the SAE's dense codes."""
from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch

from switchsae.apps import pages
from switchsae.apps.neuronpedia import EMPTY_FIELDS, export_neuronpedia, hook_layer
from switchsae.cli import main
from switchsae.saes.io import load_sae
from switchsae.sources.cache import ActivationCache

VENV = Path(os.environ.get("SWITCHSAE_SAELENS_VENV", Path.home() / ".cache/switchsae/saelens-venv"))
PYTHON = VENV / "bin" / "python"
BATCH = 100


@pytest.fixture(scope="module")
def exported(tmp_path_factory, pages_dir) -> Path:
    return export_neuronpedia(pages_dir, tmp_path_factory.mktemp("np") / "out", batch=BATCH)


@pytest.fixture(scope="module")
def records(pages_dir) -> dict[int, dict]:
    meta = pages.read_data(pages_dir, pages.META)
    chunks = range(math.ceil(meta["features"] / meta["chunk"]))
    return {r["id"]: r for chunk in chunks for r in pages.read_data(pages_dir, pages.chunk_name(chunk))}


def features(folder: Path) -> list[dict]:
    batches = sorted(folder.glob("batch-*.json"), key=lambda p: int(p.stem.split("-")[1]))
    return [f for path in batches for f in json.loads(path.read_text())["features"]]


def test_saedashboards_data_classes_read_every_batch_back(exported):
    if not PYTHON.exists() or subprocess.run([str(PYTHON), "-c", "import sae_dashboard"], check=False).returncode:
        pytest.skip(f"no sae-dashboard in {VENV}; run `bash scripts/install_saelens.sh`")
    result = subprocess.run([str(PYTHON), str(Path(__file__).with_name("neuronpedia_worker.py")), str(exported)],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["problems"] == []
    assert report["features"] == len(features(exported)) > BATCH and report["batches"] >= 2
    assert report["activations"] > 0


def test_batches_hold_the_fired_features_in_order_and_skipped_ones_are_listed(exported, records, pages_dir):
    meta = pages.read_data(pages_dir, pages.META)
    fired = [i for i, r in sorted(records.items()) if r["count"] > 0]
    assert [f["feature_index"] for f in features(exported)] == fired
    skipped = json.loads((exported / "skipped_indexes.json").read_text())
    assert skipped["skipped_indexes"] == [i for i, r in sorted(records.items()) if r["count"] == 0]
    header = json.loads((exported / "batch-0.json").read_text())
    assert {k: header[k] for k in ("model_id", "layer", "sae_set", "sae_id_suffix")} == {
        "model_id": meta["model"], "layer": 1, "sae_set": "switchsae-switch-256", "sae_id_suffix": None}
    assert len(header["features"]) == BATCH


def test_fields_come_from_the_records_and_the_vocab(exported, records, pages_dir, tiny_cache):
    vocab = pages.read_data(pages_dir, pages.VOCAB)
    manifest = ActivationCache(tiny_cache).manifest
    meta = pages.read_data(pages_dir, pages.META)
    for feature in features(exported):
        record = records[feature["feature_index"]]
        assert feature["pos_str"] == [vocab[str(t)] for t, _ in record["boost"]]
        assert feature["neg_values"] == [round(v, 3) for _, v in record["suppress"]]
        assert feature["frac_nonzero"] == record["density"]
        assert sum(feature["freq_hist_data_bar_heights"]) == record["count"]
        assert feature["n_tokens_in_prompt"] == manifest["context_length"]
        assert feature["n_prompts_total"] == math.ceil(meta["rows"] / (manifest["context_length"] - manifest["drop_first"]))
        assert feature["dataset"] == manifest["corpus"]
        assert all(feature[name] == [] for name in EMPTY_FIELDS)
        top = [a for a in feature["activations"] if a["bin_min"] == -1]
        assert len(top) == len(record["top"]) and top == feature["activations"][:len(top)]
        for activation, example in zip(top, record["top"]):
            at = activation["qualifying_token_index"]
            assert activation["values"][at] == round(example[1], 3) > 0
            assert activation["tokens"] == [vocab[str(t)] for t in example[3]]
            assert len(activation["values"]) == len(activation["tokens"])


def test_interval_groups_and_their_shares_match_the_dense_codes(exported, switch_run, tiny_cache, pages_dir):
    """``bin_contains`` is the fraction of all tokens read with ``lo <= z < hi``; each example's
    value lies in its interval; intervals come highest first, after the top group."""
    sae, cache = load_sae(switch_run), ActivationCache(tiny_cache)
    rows = pages.read_data(pages_dir, pages.META)["rows"]
    with torch.no_grad():
        z = torch.cat([sae.encode(cache.read(s, min(s + 1000, rows))).to_dense(sae.cfg.width)
                       for s in range(0, rows, 1000)])
    checked = 0
    for feature in features(exported):
        groups = [a for a in feature["activations"] if a["bin_min"] != -1]
        assert [g["bin_min"] for g in groups] == sorted((g["bin_min"] for g in groups), reverse=True)
        column = z[:, feature["feature_index"]]
        for activation in groups:
            lo, hi = activation["bin_min"], activation["bin_max"]
            share = ((column >= lo) & (column < hi) & (column > 0)).double().mean().item()
            assert abs(activation["bin_contains"] - share) <= 2 / rows + 1e-5, (feature["feature_index"], lo, hi)
            value = activation["values"][activation["qualifying_token_index"]]
            assert lo - 1e-3 <= value <= hi + 1e-3
            checked += 1
    assert checked > 0


def test_cli_export_and_its_refusals(tmp_path, pages_dir, switch_run, capsys):
    main(["export", str(pages_dir), "--format", "neuronpedia", "--out", str(tmp_path / "np"), "--sae-set", "res-x",
          "--layer", "7"])
    assert "wrote Neuronpedia batch files" in capsys.readouterr().out
    assert json.loads((tmp_path / "np" / "batch-0.json").read_text())["layer"] == 7
    for args, message in ((["--out", str(tmp_path / "np")], "already holds Neuronpedia batch files"),
                          (["--out", str(tmp_path / "x"), "--acts", "a.safetensors"], "--acts applies to --format saelens")):
        with pytest.raises(SystemExit) as exit_info:
            main(["export", str(pages_dir), "--format", "neuronpedia", *args])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", str(switch_run), "--format", "neuronpedia", "--out", str(tmp_path / "y")])
    assert "holds no feature pages" in capsys.readouterr().err
    main(["export", str(pages_dir), "--format", "neuronpedia", "--out", str(tmp_path / "np"), "--force"])


def test_layers_are_read_from_hook_names():
    assert hook_layer("blocks.10.hook_resid_post") == 10 and hook_layer("model.layers.3.mlp") == 3
    with pytest.raises(ValueError, match="pass --layer"):
        hook_layer("embed")
