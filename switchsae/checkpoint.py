"""Training checkpoints: one safetensors file, written atomically, holding everything a resume needs.

Tensors: ``sae/<param>``, ``adam/<param>/<exp_avg|exp_avg_sq|step>`` (the moments in the dtype
the run keeps them in, ``adam_moments``: a resume with the other is refused) and
``train/tokens_since_fired``. Metadata (strings):
``step``, ``elapsed_s``, the SAE and training configs, the selection matmul's dtype as the run
resolved it, the log so far, what the activations were (``activations``: a fingerprint and a
description, :func:`switchsae.sources.activations.source_identity`; a resume on other data is
refused) and ``sha256``, the checksum of everything else in the file (:func:`checkpoint_digest`),
checked on load so a damaged checkpoint is never resumed from (files from before it have none). The file is written
atomically (:func:`switchsae.host.write_atomic`), so a run killed at any moment leaves either the
previous checkpoint or the new one, never a torn file.

A run split across processes writes the same file (one portable checkpoint): its
:class:`Layout` gathers the tensors a rank holds only a part of before the write, which only
one rank does, and cuts a rank's part out of each full tensor on load, at any world size.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from switchsae.optim import LazyAdam
from switchsae.saes import SparseAutoencoder
from switchsae.saes.io import save_tensors_atomic

CHECKPOINT_FILE = "checkpoint.safetensors"


class Layout:
    """How the tensors one process holds relate to the checkpoint's full ones; in one process they
    are the same (switchsae.distributed.world.World splits expert rows across ranks)."""

    #: whether this process writes the checkpoint file
    writes: bool = True

    def full(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The full tensor of parameter ``name`` (or one of its optimizer moments) from this
        process's part (a collective where parts are spread over processes)."""
        return tensor

    def local(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """This process's part of the full tensor of parameter ``name``."""
        return tensor


WHOLE = Layout()


@dataclass
class TrainState:
    """Where a run stands: the step about to run, seconds trained so far, its log, and for each
    latent the tokens seen since it last fired (the dead-latent counter)."""

    step: int = 0
    elapsed_s: float = 0.0
    history: list[dict] | None = None
    tokens_since_fired: torch.Tensor | None = None


def checkpoint_digest(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
    """sha256 of the metadata (all but ``sha256`` itself) and of each tensor's name, dtype, shape and
    bytes, in name order."""
    digest = hashlib.sha256(json.dumps({key: meta[key] for key in sorted(meta) if key != "sha256"}).encode())
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def save_checkpoint(
    path: Path, sae: SparseAutoencoder, opt: torch.optim.Optimizer, state: TrainState, train_cfg: dict,
    layout: Layout = WHOLE, activations: dict[str, str] | None = None,
) -> None:
    """Write ``path`` atomically (module docstring); with a ``layout`` that does not write, only
    take part in gathering the tensors. ``activations`` says what the run trains on."""
    names = {id(p): n for n, p in sae.named_parameters()}
    tensors = {f"sae/{n}": layout.full(n, t.detach()).cpu().contiguous() for n, t in sae.state_dict().items()}
    for p, slots in opt.state.items():
        for slot, value in slots.items():
            tensors[f"adam/{names[id(p)]}/{slot}"] = layout.full(names[id(p)], value.detach()).cpu().contiguous()
    if not layout.writes:
        return
    if state.tokens_since_fired is not None:
        tensors["train/tokens_since_fired"] = state.tokens_since_fired.cpu()
    meta = {
        "step": str(state.step),
        "elapsed_s": repr(state.elapsed_s),
        "sae_cfg": json.dumps(sae.cfg.to_dict()),
        "train_cfg": json.dumps(train_cfg),
        "matmul_dtype": str(sae.matmul_dtype).removeprefix("torch."),  # as resolved (``auto``), for resume
        "history": json.dumps(state.history or []),
    }
    if activations is not None:
        meta["activations"] = json.dumps(activations)
    meta["sha256"] = checkpoint_digest(tensors, meta)
    save_tensors_atomic(tensors, path, meta)


def saved_activations(meta: dict[str, str]) -> dict[str, str] | None:
    """What the activations of a checkpoint's run were (``fingerprint``, ``description``), or None
    if it does not say (a checkpoint from before this was recorded, or a run on a plain iterable)."""
    return json.loads(meta["activations"]) if "activations" in meta else None


def read_checkpoint_meta(path: Path) -> dict[str, str]:
    """The metadata strings of a checkpoint, with a clear error for a missing or corrupt file."""
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; nothing to resume")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"checkpoint {path} is corrupt or unreadable: {err}") from None
    missing = {"step", "sae_cfg", "train_cfg"} - set(meta)
    if missing:
        raise ValueError(f"checkpoint {path} lacks fields {sorted(missing)}; it was not written by switchsae")
    return meta


def load_checkpoint(path: Path, sae: SparseAutoencoder, opt: torch.optim.Optimizer,
                    layout: Layout = WHOLE) -> TrainState:
    """Restore weights and optimizer moments in place (this process's part of each, ``layout``);
    return the saved :class:`TrainState`."""
    meta = read_checkpoint_meta(path)
    with safe_open(str(path), framework="pt") as fh:
        tensors = {key: fh.get_tensor(key) for key in fh.keys()}
    if "sha256" in meta and checkpoint_digest(tensors, meta) != meta["sha256"]:
        raise ValueError(f"checkpoint {path} fails its checksum: it changed after it was written (damaged on disk?), "
                         "so it is not resumed from; restore a copy, or start over with --force")
    weights = {key.removeprefix("sae/"): value for key, value in tensors.items() if key.startswith("sae/")}
    sae.load_state_dict({name: layout.local(name, value) for name, value in weights.items()})
    params = dict(sae.named_parameters())
    for key, value in tensors.items():
        if key.startswith("adam/"):
            name, slot = key.removeprefix("adam/").rsplit("/", 1)
            value = layout.local(name, value)
            if slot != "step" and isinstance(opt, LazyAdam):
                opt.check_moment(params[name], name, value)
            opt.state[params[name]][slot] = value.to(params[name].device) if slot != "step" else value
    return TrainState(int(meta["step"]), float(meta.get("elapsed_s", 0.0)), json.loads(meta.get("history", "[]")),
                      tensors.get("train/tokens_since_fired"))
