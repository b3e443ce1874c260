"""Runs inside the sae-lens==6.54.12 virtualenv (scripts/install_saelens.sh), called by
test_saelens_interop.py as ``python saelens_worker.py WORK`` with the repository on PYTHONPATH.

Reads ``WORK/inputs.safetensors`` (``x``). Then:

- every folder in ``WORK/exported/`` (written by ``switchsae export``) is loaded with
  ``SAE.load_from_disk``; its codes and reconstructions of ``x`` go to ``WORK/exported_out/NAME.safetensors``;
- SAEs with random weights are built and saved by SAELens itself into ``WORK/native/NAME/``, their
  codes and reconstructions into ``WORK/native_out/NAME.safetensors``.

``WORK/report.json`` names the class each folder loaded as.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from sae_lens import SAE, BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig

import switchsae.apps.saelens_switch  # noqa: F401  registers "switch"

D_IN, D_SAE, K = 64, 256, 8


def outputs(sae: SAE, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        z = sae.encode(x)
        return {"z": z.contiguous(), "x_hat": sae.decode(z).contiguous()}


def randomise(sae: SAE, gen: torch.Generator) -> None:
    """Every parameter random (TopK-family encoder biases too: they import as switchsae's ``encoder_bias``)."""
    with torch.no_grad():
        for name, param in sae.named_parameters():
            scale = 0.5 if name in ("b_dec", "threshold") else 0.1
            param.copy_(torch.randn(param.shape, generator=gen) * scale)
        if hasattr(sae, "threshold"):
            sae.threshold.abs_()
            sae.threshold[:8] = -0.1  # thresholds <= 0: plain ReLU in SAELens


def native_saes(gen: torch.Generator) -> dict[str, SAE]:
    base = {"d_in": D_IN, "d_sae": D_SAE, "metadata": {"model_name": "tiny", "hook_name": "blocks.1.hook_resid_post"}}
    specs = {
        "standard": {"architecture": "standard"},
        "standard_raw_input": {"architecture": "standard", "apply_b_dec_to_input": False},
        "topk": {"architecture": "topk", "k": K},
        "topk_rescaled": {"architecture": "topk", "k": K, "rescale_acts_by_decoder_norm": True},
        "topk_raw_input": {"architecture": "topk", "k": K, "apply_b_dec_to_input": False},
        "jumprelu": {"architecture": "jumprelu"},
        "gated": {"architecture": "gated"},
        "gated_raw_input": {"architecture": "gated", "apply_b_dec_to_input": False},
        "switch": {"architecture": "switch", "k": K, "n_experts": 4},
    }
    saes = {}
    for name, spec in specs.items():
        saes[name] = SAE.from_dict({**base, **spec})
        randomise(saes[name], gen)
    return saes


def main(work: Path) -> None:
    x = load_file(str(work / "inputs.safetensors"))["x"]
    gen = torch.Generator().manual_seed(0)
    report = {}
    for name in ("exported_out", "native_out"):
        (work / name).mkdir(exist_ok=True)
    for folder in sorted((work / "exported").iterdir()):
        sae = SAE.load_from_disk(folder)
        report[f"exported/{folder.name}"] = type(sae).__name__
        save_file(outputs(sae, x), str(work / "exported_out" / f"{folder.name}.safetensors"))
        if folder.name == "switch":
            with torch.no_grad():  # leading dimensions, as a hooked [batch, position, d] activation has them
                flat = sae(x)
                report["switch_forward_3d_max_diff"] = (sae(x.view(2, -1, D_IN)).reshape(flat.shape) - flat).abs().max().item()
            try:
                sae.fold_W_dec_norm()
            except NotImplementedError:
                report["switch_fold_W_dec_norm"] = "refused"
    for name, sae in native_saes(gen).items():
        sae.save_model(work / "native" / name)
        report[f"native/{name}"] = type(sae).__name__
        save_file(outputs(sae, x), str(work / "native_out" / f"{name}.safetensors"))
    # BatchTopK as SAELens saves it: the inference save is a JumpReLU SAE, a training checkpoint
    # keeps architecture "batchtopk"; both are checked against the JumpReLU's outputs.
    trainer = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K))
    randomise(trainer, gen)
    trainer.topk_threshold = torch.tensor(0.3, dtype=torch.double)
    trainer.save_inference_model(work / "native" / "batchtopk")
    trainer.save_model(work / "native" / "batchtopk_checkpoint")
    inference = SAE.load_from_disk(work / "native" / "batchtopk")
    report["native/batchtopk"] = type(inference).__name__
    for name in ("batchtopk", "batchtopk_checkpoint"):
        save_file(outputs(inference, x), str(work / "native_out" / f"{name}.safetensors"))
    (work / "report.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
