"""What both evaluations do around their math: load the SAEs of several runs, check that they read
one model at one hook, which expert holds each latent, and save results."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from switchsae.saes import SparseAutoencoder, reads_setting
from switchsae.saes.io import load_sae, write_json_atomic
from switchsae.sources.hooks import HookPoint


@dataclass
class LoadedRun:
    """One run folder's SAE and the name results use for it (the folder's name)."""

    path: Path
    sae: SparseAutoencoder

    @property
    def name(self) -> str:
        return self.path.name


def load_runs(runs: list[str | Path], model: str | None = None) -> tuple[list[LoadedRun], str, HookPoint]:
    """The SAEs of ``runs``, the model they read (``model`` overrides the one their configs name) and
    their hook; runs naming different models, hooks or widths, or none, are refused."""
    if not runs:
        raise ValueError("Give at least one run folder to evaluate.")
    loaded = [LoadedRun(Path(run), load_sae(run)) for run in runs]
    first = loaded[0]
    for run in loaded:
        cfg = run.sae.cfg
        if not cfg.hook_name:
            raise ValueError(f"The SAE in {run.path} names no hook point, so it cannot be evaluated inside a model.")
        if not (model or cfg.model_name):
            raise ValueError(f"The SAE in {run.path} names no model; pass one with --model.")
        for field in ("hook_name", "d_model") + (() if model else ("model_name",)):
            if getattr(cfg, field) != getattr(first.sae.cfg, field):
                raise ValueError(f"The SAEs read different activations: {run.path} has {field} "
                                 f"{getattr(cfg, field)!r}, {first.path} has {getattr(first.sae.cfg, field)!r}; "
                                 f"evaluate them in separate commands.")
    return loaded, model or first.sae.cfg.model_name, HookPoint.parse(first.sae.cfg.hook_name)


def check_width(acts: Tensor, hook: HookPoint, model_name: str, sae: SparseAutoencoder) -> None:
    """Refuse activations of another width than the SAE reads (a model/hook mismatch)."""
    if acts.shape[-1] != sae.cfg.d_model:
        raise ValueError(f"{hook.name} of model {model_name} is {acts.shape[-1]} wide, but the SAE reads "
                         f"{sae.cfg.d_model}-wide activations: the SAE was not trained on this model.")


def expert_of_latents(sae: SparseAutoencoder) -> Tensor | None:
    """``[M]``: the expert (block of ``M / blocks`` consecutive latents) of every latent of a Switch
    SAE, a shared expert being the last block; None for SAEs without experts."""
    cfg = sae.cfg
    if not reads_setting(cfg.arch, "n_experts"):
        return None
    blocks = cfg.n_experts + int(cfg.routing.shared_expert)
    return torch.arange(cfg.width) // (cfg.width // blocks)


def save_result(out: str | Path, result: dict) -> None:
    """``result`` as JSON at ``out`` (its folder created), atomically."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, result)
