"""Run folders to and from SAELens 6 SAE folders (``cfg.json``, ``sae_weights.safetensors``,
optionally ``sparsity.safetensors``), as written by sae-lens 6.54.12.

Conventions. SAELens stores ``W_enc: [d, M]`` (``x @ W_enc``), ``W_dec: [M, d]``, ``b_dec`` and
feeds its SAEs raw activations. We store ``W_enc: [M, d]``, call ``b_dec`` ``b_pre``, and multiply
raw inputs by ``s = act_scale`` before encoding, dividing the output by ``s``. Export folds ``s``
into the weights, so the SAELens SAE takes raw activations and returns the same codes ``z``::

    W_enc (s·x − b_pre)     = (s·W_enc)(x − b_pre/s)    →  W_enc' = s·W_encᵀ,   b_dec' = b_pre/s
    (W_dec z + b_pre) / s   = (W_dec/s) z + b_pre/s     →  W_dec' = W_dec/s
    W_r (s·x − b_r)         = (s·W_r)(x − b_r/s)        →  W_router' = s·W_rᵀ,  b_router' = b_r/s

The pre-activations are unchanged by the fold, so what acts on them is copied: ``b_enc``,
thresholds, ``b_gate`` (our ``b_enc``), ``b_mag``, ``r_mag``. Decoder rows come out with norm
``1/s`` (unit norm in the normalised space), as SAELens's own ``fold_activation_norm_scaling_factor``
leaves them. Architectures, ours → SAELens:

    relu      → standard    ReLU(pre)
    topk      → topk        b_enc = ours (0 without cfg.encoder_bias), rescale_acts_by_decoder_norm = false
    batchtopk → jumprelu    θ_j = our one learned threshold θ for every latent, b_enc as for topk:
                            ReLU(pre)·1[pre > θ] is our a·1[a > θ] with a = ReLU(pre), θ ≥ 0
                            (SAELens saves its own BatchTopK SAEs this way)
    jumprelu  → jumprelu    θ = exp(log_threshold)
    gated     → gated
    switch    → switch      loads in SAELens once switchsae.apps.saelens_switch is imported

Import is the reverse with ``act_scale = 1``. SAELens's ``apply_b_dec_to_input = false``
(``pre = x W_enc + b_enc``) is absorbed into the encoder bias, ``b_enc ← b_enc + b_dec W_enc``
(for Gated ``b_gate`` likewise and ``b_mag ← b_mag + exp(r_mag) ⊙ b_dec W_enc``);
``rescale_acts_by_decoder_norm`` (TopK, BatchTopK) is folded as SAELens folds it
(``W_enc[:, j], b_enc_j ×= ‖W_dec[j]‖``, ``W_dec[j] /= ‖W_dec[j]‖``). A TopK or BatchTopK SAE
whose resulting ``b_enc`` is not zero imports with our optional encoder bias (``encoder_bias``,
saes/topk.py), the same ``ReLU(TopK(x W_enc + b_enc))``; with ``b_enc = 0`` it imports without
one (the fused training path). Our Switch SAE has no encoder bias, so a ``switch`` folder whose
resulting ``b_enc`` is not zero (only ``apply_b_dec_to_input = false`` makes one) is refused.
A JumpReLU threshold ``θ ≤ 0`` becomes the smallest positive float (ours stores ``log θ``), which
changes only latents whose value lies in ``(0, 1.2e-38]``. Weights are read with safetensors only.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from switchsae.config import FLAT_DEFAULTS, SAEConfig
from switchsae.saes import SparseAutoencoder, build_sae
from switchsae.saes.io import load_sae, save_sae, save_tensors_atomic, write_json_atomic
from switchsae.sources.activations import open_activations
from switchsae.train import RUN_OUTPUTS

SAELENS_VERSION = "6.54.12"
CFG_NAME, WEIGHTS_NAME, SPARSITY_NAME = "cfg.json", "sae_weights.safetensors", "sparsity.safetensors"
#: our architecture → the SAELens architecture it is exported as
EXPORT_ARCH = {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu",
               "gated": "gated", "switch": "switch"}
#: SAELens architecture (as its cfg.json names it) → ours; "batchtopk" is a SAELens training
#: checkpoint (its final inference save is "jumprelu")
IMPORT_ARCH = {"standard": "relu", "topk": "topk", "batchtopk": "batchtopk", "jumprelu": "jumprelu",
               "gated": "gated", "switch": "switch"}
#: SAEConfig fields the SAELens format carries (or that only matter for training); any other field
#: set away from its default changes the SAE in a way an export would silently drop
EXPORTABLE_FIELDS = {"arch", "d_model", "width", "k", "encoder_bias", "n_experts", "l1_coeff", "aux_coeff", "z_loss_coeff",
                     "aux_units", "auxk_coeff", "auxk_k", "dead_tokens", "jump_threshold", "jump_bandwidth",
                     "act_scale", "unit_scale", "hook_name", "model_name"}
#: added to each firing density before the log10, as SAELens does (a latent that never fires: -10)
DENSITY_EPS = 1e-10


# -- export ---------------------------------------------------------------------------------
def export_saelens(run_dir: str | Path, out: str | Path, acts: str | Path | None = None,
                   batch_size: int = 4096, force: bool = False) -> Path:
    """Write the SAE in ``run_dir`` as a SAELens folder ``out``; with ``acts``, also
    ``sparsity.safetensors``: ``log10(firing density + 1e-10)`` of each latent on the held-out rows
    (without ``acts`` none is written; SAELens then reports no sparsity)."""
    sae = load_sae(run_dir)
    cfg, files = saelens_cfg(sae.cfg), {WEIGHTS_NAME: saelens_tensors(sae)}
    if acts is not None:
        source = open_activations(acts)
        if source.d_model != sae.cfg.d_model:
            raise ValueError(f"activations have d_model={source.d_model} but the SAE expects {sae.cfg.d_model}")
        files[SPARSITY_NAME] = {"sparsity": log_firing_density(sae, source.eval_batches(batch_size))}
    out = _claim(Path(out), (CFG_NAME, WEIGHTS_NAME, SPARSITY_NAME), force)  # only once all is computed
    for name, tensors in files.items():
        save_tensors_atomic(tensors, out / name)
    write_json_atomic(out / CFG_NAME, cfg)
    return out


def saelens_cfg(cfg: SAEConfig) -> dict:
    """SAELens's ``cfg.json`` for an SAE of ``cfg`` with ``act_scale`` folded into the weights."""
    unexportable = {name: value for name, value in cfg.flat().items()
                    if name not in EXPORTABLE_FIELDS and value != FLAT_DEFAULTS.get(name, value)}
    if unexportable:
        raise ValueError(f"cannot export to SAELens: settings {unexportable} have no SAELens equivalent")
    out = {"architecture": EXPORT_ARCH[cfg.arch], "d_in": cfg.d_model, "d_sae": cfg.width, "dtype": "float32",
           "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
           "reshape_activations": "none",
           "metadata": {"sae_lens_version": SAELENS_VERSION, "sae_lens_training_version": None,
                        "model_name": cfg.model_name or None, "hook_name": cfg.hook_name or None,  # None: unknown
                        "switchsae": {"arch": cfg.arch, "act_scale": cfg.act_scale}}}
    if cfg.arch in ("topk", "switch"):
        out["k"] = cfg.k
    if cfg.arch == "topk":
        out["rescale_acts_by_decoder_norm"] = False
    if cfg.arch == "switch":
        out["n_experts"] = cfg.n_experts
    return out


def saelens_tensors(sae: SparseAutoencoder) -> dict[str, Tensor]:
    """SAELens's weights for ``sae`` (float32), ``act_scale`` folded in (module docstring)."""
    s, arch, width = sae.cfg.act_scale, sae.cfg.arch, sae.cfg.width
    ours = {name: t.detach().float().cpu() for name, t in sae.state_dict().items()}
    out = {"W_enc": s * ours.pop("W_enc").t(), "W_dec": ours.pop("W_dec") / s, "b_dec": ours.pop("b_pre") / s}
    if arch in ("relu", "jumprelu"):
        out["b_enc"] = ours.pop("b_enc")
    if arch == "jumprelu":
        out["threshold"] = ours.pop("log_threshold").exp()
    if arch in ("topk", "batchtopk"):
        out["b_enc"] = ours.pop("b_enc") if "b_enc" in ours else torch.zeros(width)
    if arch == "batchtopk":
        out["threshold"] = ours.pop("threshold").expand(width).clone()
    if arch == "gated":
        out.update(b_gate=ours.pop("b_enc"), b_mag=ours.pop("b_mag"), r_mag=ours.pop("r_mag"))
    if arch == "switch":
        out.update(W_router=s * ours.pop("W_router").t(), b_router=ours.pop("b_router") / s)
    if ours:
        raise ValueError(f"cannot export {arch} to SAELens: no SAELens field for tensors {sorted(ours)}")
    return out


@torch.no_grad()
def log_firing_density(sae: SparseAutoencoder, batches: Iterable[Tensor]) -> Tensor:
    """``log10(fired_j / T + 1e-10)`` per latent over the ``T`` tokens of ``batches``, ``[M]``."""
    fired, tokens = torch.zeros(sae.cfg.width, dtype=torch.long), 0
    with sae.inference():
        for x in batches:
            fired += sae.encode(x).fired(sae.cfg.width)
            tokens += x.shape[0]
    if tokens == 0:
        raise ValueError("no held-out activations to measure firing densities on")
    return torch.log10(fired.double() / tokens + DENSITY_EPS).float()


# -- import ---------------------------------------------------------------------------------
def import_saelens(folder: str | Path, out: str | Path, force: bool = False) -> Path:
    """Convert the SAELens SAE folder ``folder`` into a switchsae run folder ``out``."""
    folder = Path(folder)
    cfg_path, weights_path = folder / CFG_NAME, folder / WEIGHTS_NAME
    for path in (cfg_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; is {folder} a SAELens SAE folder?")
    try:
        cfg = json.loads(cfg_path.read_text())
        tensors = {name: t.float() for name, t in load_file(str(weights_path)).items()}
    except json.JSONDecodeError as err:
        raise ValueError(f"{cfg_path} is not valid JSON: {err}") from None
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{weights_path} is corrupt or not a safetensors file: {err}") from None
    try:
        sae_cfg = switchsae_cfg(cfg, cfg_path)
        ours = switchsae_tensors(cfg, tensors)
        if sae_cfg.arch in ("topk", "batchtopk") and "b_enc" in ours:
            sae_cfg = sae_cfg.replace(encoder_bias=True)
        sae = build_sae(sae_cfg)
    except KeyError as err:
        raise ValueError(f"{folder} is not a complete SAELens {cfg.get('architecture', 'standard')} SAE: "
                         f"{err} is missing") from None
    expected = sae.state_dict()
    if set(ours) != set(expected):  # our architecture changed under this converter
        raise ValueError(f"switchsae's {sae.cfg.arch} holds {sorted(expected)}; the import made {sorted(ours)}")
    for name, tensor in ours.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(f"{weights_path}: {name} has shape {tuple(tensor.shape)}, expected {tuple(expected[name].shape)}")
    sae.load_state_dict(ours)
    return save_sae(sae, _claim(Path(out), RUN_OUTPUTS, force))


def switchsae_cfg(cfg: dict, cfg_path: Path) -> SAEConfig:
    """Our config for the SAELens ``cfg.json`` contents ``cfg`` (``act_scale = 1``)."""
    arch = cfg.get("architecture", "standard")
    if arch not in IMPORT_ARCH:
        raise ValueError(f"SAELens architecture {arch!r} is not supported; switchsae imports {', '.join(IMPORT_ARCH)}")
    for key, supported in (("normalize_activations", ("none", "expected_average_only_in")),
                           ("reshape_activations", ("none",))):
        if cfg.get(key, "none") not in supported:
            raise ValueError(f"{cfg_path}: {key}={cfg[key]!r} is not supported (only {', '.join(supported)})")
    metadata = cfg.get("metadata") or {}
    fields: dict[str, Any] = dict(arch=IMPORT_ARCH[arch], d_model=int(cfg["d_in"]), width=int(cfg["d_sae"]),
                  model_name=metadata.get("model_name") or "", hook_name=metadata.get("hook_name") or "")
    if arch in ("topk", "batchtopk", "switch"):
        fields["k"] = max(1, round(cfg["k"]))  # BatchTopK's k is a mean count, a float in SAELens
    if arch == "switch":
        fields["n_experts"] = int(cfg["n_experts"])
    return SAEConfig(**fields)


def switchsae_tensors(cfg: dict, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our state dict for SAELens weights ``tensors`` of an SAE with ``cfg.json`` contents ``cfg``."""
    arch, t = cfg.get("architecture", "standard"), dict(tensors)
    if cfg.get("rescale_acts_by_decoder_norm", False):
        norms = t["W_dec"].norm(dim=1).clamp_min(1e-8)
        t["W_enc"], t["W_dec"] = t["W_enc"] * norms, t["W_dec"] / norms[:, None]
        if "b_enc" in t:
            t["b_enc"] = t["b_enc"] * norms
    W_enc = t.pop("W_enc")
    # what SAELens adds to the pre-activations that ours does not: b_dec·W_enc where b_dec is not subtracted first
    shift = 0 if cfg.get("apply_b_dec_to_input", True) else t["b_dec"] @ W_enc
    ours = {"W_enc": W_enc.t().contiguous(), "W_dec": t.pop("W_dec"), "b_pre": t.pop("b_dec")}
    if arch in ("standard", "jumprelu"):
        ours["b_enc"] = t.pop("b_enc") + shift
    if arch == "jumprelu":
        ours["log_threshold"] = t.pop("threshold").clamp_min(torch.finfo(torch.float32).tiny).log()
    if arch in ("topk", "batchtopk", "switch"):
        bias = t.pop("b_enc", torch.zeros(W_enc.shape[1])) + shift
        if bias.any() and arch != "switch":  # our optional encoder bias; none when it is 0
            ours["b_enc"] = bias
        elif bias.any():
            raise ValueError(f"SAELens {arch} SAE has an encoder bias (max |b_enc| = {bias.abs().max():.3g}"
                             f"{'' if cfg.get('apply_b_dec_to_input', True) else ', from apply_b_dec_to_input=false'}); "
                             f"switchsae's {IMPORT_ARCH[arch]} has none")
    if arch == "batchtopk":
        ours["threshold"] = t.pop("topk_threshold").reshape(())
    if arch == "gated":
        r_mag = t.pop("r_mag")
        ours.update(b_enc=t.pop("b_gate") + shift, r_mag=r_mag, b_mag=t.pop("b_mag") + r_mag.exp() * shift)
    if arch == "switch":
        ours.update(W_router=t.pop("W_router").t().contiguous(), b_router=t.pop("b_router"))
    if t:
        raise ValueError(f"SAELens {arch} weights hold tensors switchsae does not know: {sorted(t)}")
    return ours


def _claim(out: Path, names: tuple[str, ...], force: bool) -> Path:
    """``out``, created. A folder already holding one of ``names`` is refused, or with ``force``
    cleared of them (so nothing of the SAE it held before, such as its metrics, stays behind)."""
    taken = [out / name for name in names if (out / name).exists()]
    if taken and not force:
        raise FileExistsError(f"{out} already holds {', '.join(p.name for p in taken)}; pass --force to overwrite it")
    for path in taken:
        path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out
