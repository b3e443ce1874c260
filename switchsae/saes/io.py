"""Saved SAEs are a folder: ``cfg.json`` + ``sae_weights.safetensors``. Nothing is ever unpickled."""
from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from switchsae.config import SAEConfig
from switchsae.host import write_text_atomic
from switchsae.saes import SparseAutoencoder, build_sae

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON to ``path`` atomically (:func:`switchsae.host.write_text_atomic`): readers never see half a file."""
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def save_sae(sae: SparseAutoencoder, folder: str | Path) -> Path:
    """Write ``cfg.json`` and the weights (atomically) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (WEIGHTS_FILE + ".tmp")
    save_file({name: p.detach().cpu().contiguous() for name, p in sae.state_dict().items()}, str(tmp))
    os.replace(tmp, folder / WEIGHTS_FILE)
    write_json_atomic(folder / CFG_FILE, sae.cfg.to_dict())
    return folder


def load_sae(folder: str | Path) -> SparseAutoencoder:
    """Rebuild an SAE from a folder written by :func:`save_sae`; every weight must match exactly."""
    folder = Path(folder)
    cfg_path, weights_path = folder / CFG_FILE, folder / WEIGHTS_FILE
    for path in (cfg_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; is {folder} a saved SAE folder?")
    try:
        cfg = SAEConfig.from_dict(json.loads(cfg_path.read_text()))
    except json.JSONDecodeError as err:
        raise ValueError(f"{cfg_path} is not valid JSON: {err}") from None
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
            raise ValueError(f"{weights_path}: {name} has shape {tuple(tensor.shape)}, cfg.json implies {tuple(expected[name].shape)}")
    sae.load_state_dict(tensors)
    return sae
