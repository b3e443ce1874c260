"""Saved SAEs are a folder: ``switchsae_cfg.json`` + ``switchsae_weights.safetensors``. Nothing is ever unpickled.

The names are our own: SAELens's ``cfg.json`` + ``sae_weights.safetensors`` hold another schema
(see :mod:`switchsae.apps.saelens` to convert). Run folders written before the rename used those
names for our schema; :func:`sae_files` still finds them, so old runs keep loading.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from switchsae.config import SAEConfig
from switchsae.host import write_atomic, write_text_atomic
from switchsae.saes import SparseAutoencoder, build_sae

CFG_FILE = "switchsae_cfg.json"
WEIGHTS_FILE = "switchsae_weights.safetensors"
#: the names run folders used before the rename (SAELens's names, our schema); read, never written
LEGACY_CFG_FILE = "cfg.json"
LEGACY_WEIGHTS_FILE = "sae_weights.safetensors"


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON to ``path`` atomically (:func:`switchsae.host.write_text_atomic`): readers never see half a file."""
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def save_tensors_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (moved to the CPU, made contiguous) and ``metadata`` as safetensors, atomically
    (:func:`switchsae.host.write_atomic`)."""
    cpu = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    try:
        write_atomic(path, lambda tmp: save_file(cpu, str(tmp), metadata=metadata))
    except SafetensorError as err:  # how safetensors reports an OS error while writing (a full disk)
        raise OSError(f"cannot write {path}: {err}") from None


def sae_files(folder: str | Path) -> tuple[Path, Path]:
    """The config and weights files of the SAE saved in ``folder``: ours, or the legacy names where
    only those exist (a run saved before the rename). Neither need exist."""
    folder = Path(folder)
    if not (folder / CFG_FILE).exists() and (folder / LEGACY_CFG_FILE).exists():
        return folder / LEGACY_CFG_FILE, folder / LEGACY_WEIGHTS_FILE
    return folder / CFG_FILE, folder / WEIGHTS_FILE


def read_cfg_dict(folder: str | Path) -> dict:
    """The saved SAE config of ``folder`` as a plain dict (see :func:`sae_files`)."""
    cfg_path = sae_files(folder)[0]
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} is missing; is {Path(folder)} a saved SAE folder?")
    try:
        data = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{cfg_path} is not valid JSON: {err}") from None
    if cfg_path.name == LEGACY_CFG_FILE and "d_in" in data:
        raise ValueError(f"{folder} holds a SAELens SAE; convert it with `switchsae import {folder} --out RUN`")
    return data


def save_sae(sae: SparseAutoencoder, folder: str | Path) -> Path:
    """Write the weights and then the config (each atomically) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors_atomic(sae.state_dict(), folder / WEIGHTS_FILE)
    write_json_atomic(folder / CFG_FILE, sae.cfg.to_dict())
    return folder


def load_sae(folder: str | Path) -> SparseAutoencoder:
    """Rebuild an SAE from a folder written by :func:`save_sae`; every weight must match exactly.

    It comes back in eval mode, as it is used (expert-choice and Sinkhorn routing route top-1,
    BatchTopK selects by its threshold); ``.train()`` gives the training-time behaviour."""
    cfg_path, weights_path = sae_files(folder)
    cfg = SAEConfig.from_dict(read_cfg_dict(folder))
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path} is missing; is {Path(folder)} a saved SAE folder?")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{weights_path} is corrupt or not a safetensors file: {err}") from None
    sae = build_sae(cfg)
    expected = sae.state_dict()
    if set(tensors) != set(expected):
        raise ValueError(f"{weights_path} holds tensors {sorted(tensors)}, expected {sorted(expected)} for {cfg.arch}")
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(f"{weights_path}: {name} has shape {tuple(tensor.shape)}, "
                             f"{cfg_path.name} implies {tuple(expected[name].shape)}")
    sae.load_state_dict(tensors)
    return sae.eval()
