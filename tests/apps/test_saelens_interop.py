"""Against a real sae-lens==6.54.12 in its own virtualenv (scripts/install_saelens.sh; .ci/run
creates it): our exports load in SAELens with our outputs, and SAEs SAELens saved import with
SAELens's outputs. One worker process (saelens_worker.py) serves the whole module."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from switchsae.apps.saelens import export_saelens, import_saelens
from switchsae.config import SAEConfig, TrainConfig
from switchsae.saes.io import load_sae
from switchsae.sources.synthetic import synthetic_activations
from switchsae.train import train

VENV = Path(os.environ.get("SWITCHSAE_SAELENS_VENV", Path.home() / ".cache/switchsae/saelens-venv"))
PYTHON = VENV / "bin" / "python"
REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not PYTHON.exists(), reason=f"no SAELens virtualenv at {VENV}; create it with "
                                                             "`bash scripts/install_saelens.sh`")

D, M, K = 64, 256, 8
#: our exports (folder name → architecture, encoder_bias) and the SAELens class each must load as
EXPORTS = {"relu": ("relu", False), "topk": ("topk", False), "batchtopk": ("batchtopk", False),
           "jumprelu": ("jumprelu", False), "gated": ("gated", False), "switch": ("switch", False),
           "topk_encoder_bias": ("topk", True), "batchtopk_encoder_bias": ("batchtopk", True)}
LOADS_AS = {"relu": "StandardSAE", "topk": "TopKSAE", "batchtopk": "JumpReLUSAE", "jumprelu": "JumpReLUSAE",
            "gated": "GatedSAE", "switch": "SwitchSAE", "topk_encoder_bias": "TopKSAE",
            "batchtopk_encoder_bias": "JumpReLUSAE"}
#: SAEs the worker has SAELens save (saelens_worker.py) → the architecture they import as
NATIVE = {"standard": "relu", "standard_raw_input": "relu", "topk": "topk", "topk_rescaled": "topk",
          "topk_raw_input": "topk",
          "jumprelu": "jumprelu", "gated": "gated", "gated_raw_input": "gated", "batchtopk": "jumprelu",
          "batchtopk_checkpoint": "batchtopk", "switch": "switch"}
#: worst absolute difference allowed, relative to the largest magnitude of the compared tensor
REL_TOL = 1e-5


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """Train and export one tiny SAE per architecture, then run the worker in the SAELens venv."""
    work = tmp_path_factory.mktemp("saelens")
    acts = synthetic_activations(3000, D, n_features=512, active=6, seed=0) * 20 + 3  # act_scale far from 1
    acts_file = work / "acts.safetensors"
    save_file({"activations": acts}, str(acts_file))
    save_file({"x": acts[-128:].contiguous()}, str(work / "inputs.safetensors"))
    for name, (arch, encoder_bias) in EXPORTS.items():
        cfg = SAEConfig(arch=arch, d_model=D, width=M, k=K, n_experts=4 if arch == "switch" else 1, l1_coeff=0.01,
                        encoder_bias=encoder_bias, hook_name="blocks.3.hook_resid_post", model_name="tiny-model")
        train(cfg, acts, TrainConfig(steps=4, batch_size=256, normalize=True, lr=1e-3), run_dir=work / "runs" / name,
              progress=False)
        export_saelens(work / "runs" / name, work / "exported" / name, acts=acts_file if arch == "topk" else None)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([str(PYTHON), str(Path(__file__).with_name("saelens_worker.py")), str(work)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return work


def ours(folder: Path, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Our codes (dense) and reconstructions of ``x`` for the run in ``folder``."""
    sae = load_sae(folder)
    with torch.no_grad():
        code = sae.encode(x)
        return {"z": code.to_dense(sae.cfg.width), "x_hat": sae.decode(code)}


def assert_same(mine: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], label: str) -> None:
    for key in ("z", "x_hat"):
        diff = (mine[key] - theirs[key]).abs().max().item()
        scale = theirs[key].abs().max().item()
        print(f"{label} {key}: max |diff| {diff:.3g} (max |value| {scale:.3g})", file=sys.stderr)
        assert diff <= REL_TOL * scale, f"{label} {key}: max |diff| {diff:.3g} against max |value| {scale:.3g}"
    assert ((mine["z"] != 0) == (theirs["z"] != 0)).all(), f"{label}: other latents fire"


@pytest.mark.parametrize("name", EXPORTS)
def test_our_export_loads_in_saelens_with_our_outputs(work, name):
    report = json.loads((work / "report.json").read_text())
    assert report[f"exported/{name}"] == LOADS_AS[name]
    x = load_file(str(work / "inputs.safetensors"))["x"]
    theirs = load_file(str(work / "exported_out" / f"{name}.safetensors"))
    mine = ours(work / "runs" / name, x)
    assert (mine["z"] != 0).any(), "a test without firing latents proves nothing"
    if EXPORTS[name][1]:  # a trained encoder bias, not the zeros an SAE without one exports
        assert load_file(str(work / "exported" / name / "sae_weights.safetensors"))["b_enc"].abs().max() > 0
    assert_same(mine, theirs, f"export {name}")


def test_saelens_switch_takes_leading_dimensions_and_refuses_to_fold_decoder_norms(work):
    report = json.loads((work / "report.json").read_text())
    assert report["switch_forward_3d_max_diff"] == 0
    assert report["switch_fold_W_dec_norm"] == "refused"


@pytest.mark.parametrize("name", NATIVE)
def test_an_sae_saelens_saved_imports_with_saelens_outputs(work, name, tmp_path):
    run = import_saelens(work / "native" / name, tmp_path / name)
    x = load_file(str(work / "inputs.safetensors"))["x"]
    theirs = load_file(str(work / "native_out" / f"{name}.safetensors"))
    assert (theirs["z"] != 0).any()
    assert load_sae(run).cfg.arch == NATIVE[name]
    if NATIVE[name] in ("topk", "batchtopk"):  # SAELens's random b_enc ≠ 0 needs our encoder bias
        assert load_sae(run).cfg.encoder_bias
    assert_same(ours(run, x), theirs, f"import {name}")
