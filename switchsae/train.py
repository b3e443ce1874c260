"""The training loop (nanoGPT's shape) and the run around it: init, checkpoints, resume.

Recipe (SPEC §1): decoder rows unit-norm at init and after every step, with the gradient's
component along each row removed before the step; encoder initialised to the decoder's
transpose; ``b_pre`` (and ``b_r``) at the geometric median of a sample; Adam; learning rate
``2e-4 / sqrt(M / 2^14)`` unless given, decayed linearly to zero over the last 20% of steps.
"""
from __future__ import annotations

import itertools
import json
import math
import time
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import Tensor
from tqdm.auto import tqdm

from switchsae.checkpoint import CHECKPOINT_FILE, TrainState, load_checkpoint, read_checkpoint_meta, save_checkpoint
from switchsae.config import SAEConfig, TrainConfig, default_lr
from switchsae.memory import reuse_freed_memory
from switchsae.optim import LazyAdam
from switchsae.saes import SETTING_ARCHS, SparseAutoencoder, build_sae, reads_setting
from switchsae.saes.io import CFG_FILE, WEIGHTS_FILE, save_sae, write_json_atomic
from switchsae.sources.activations import ActivationSource, TensorSource

Batches = ActivationSource | Tensor | Iterable[Tensor]


TRAIN_CFG_FILE = "train_config.json"
RUN_OUTPUTS = (CHECKPOINT_FILE, WEIGHTS_FILE, CFG_FILE, TRAIN_CFG_FILE, "log.jsonl", "metrics.json")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last checkpoint is left untouched."""


def lr_at(step: int, cfg: TrainConfig, base_lr: float) -> float:
    """Constant ``base_lr``, then linear decay to zero over the last ``lr_decay_frac`` of steps."""
    decay_steps = int(cfg.steps * cfg.lr_decay_frac)
    decay_start = cfg.steps - decay_steps
    if step < decay_start or decay_steps == 0:
        return base_lr
    return base_lr * (cfg.steps - step) / decay_steps


def batch_stream(source: Batches, cfg: TrainConfig, start_step: int) -> Iterator[Tensor]:
    """Training batches from step ``start_step`` on.

    A plain iterable has no notion of steps: it must replay the same stream each time it is
    iterated, and the first ``start_step`` batches are skipped on resume.
    """
    if isinstance(source, Tensor):
        source = TensorSource(source)
    if isinstance(source, ActivationSource):
        return source.train_batches(cfg.batch_size, cfg.seed, start_step)
    return itertools.islice(iter(source), start_step, None)


def activation_scale(x: Tensor) -> float:
    """The constant ``c`` with ``mean ‖c·x‖ = sqrt(d)`` (SAELens / dictionary_learning convention)."""
    return math.sqrt(x.shape[1]) / x.float().norm(dim=1).mean().item()


def _batch_stats(x: Tensor, out, losses: dict[str, Tensor]) -> dict[str, float]:
    x = x.float()
    err = (x - out.x_hat).pow(2).sum()
    var = (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
    stats = {name: value.item() for name, value in losses.items()}
    stats.update(fvu=(err / var).item(), l0=out.latents.l0().float().mean().item())
    return stats


def train_loop(
    sae: SparseAutoencoder,
    batches: Iterator[Tensor],
    cfg: TrainConfig,
    state: TrainState,
    run_dir: Path | None = None,
    progress: bool = True,
) -> TrainState:
    """Run steps ``state.step .. cfg.steps - 1``; checkpoint to ``run_dir`` every ``checkpoint_every``."""
    base_lr = cfg.lr or default_lr(sae.cfg.width if cfg.lr_width == "total" else sae.cfg.expert_width)
    opt = optimizer_for(sae, cfg)
    if run_dir is not None and state.step > 0:
        state = load_checkpoint(run_dir / CHECKPOINT_FILE, sae, opt)
    history = state.history or []
    device = sae.W_dec.device
    if device.type == "cpu":
        reuse_freed_memory()
    tokens_since_fired = state.tokens_since_fired
    if tokens_since_fired is None:
        tokens_since_fired = torch.zeros(sae.cfg.width, dtype=torch.long)
    tokens_since_fired = tokens_since_fired.to(device)
    bar = tqdm(total=cfg.steps, initial=state.step, disable=not progress, desc=f"train {sae.cfg.arch}", unit="step")
    started = time.perf_counter() - state.elapsed_s
    for step in range(state.step, cfg.steps):
        x = next(batches).to(device, non_blocking=True)
        out = sae(x)
        losses = sae.loss(x, out)
        if not torch.isfinite(losses["loss"]):
            terms = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
            raise TrainingDiverged(f"loss is not finite at step {step} ({terms}); the last checkpoint is intact; try a lower --lr")
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg, base_lr)
        opt.step()
        tokens_since_fired += x.shape[0]
        tokens_since_fired[out.latents.fired(sae.cfg.width) > 0] = 0
        bar.update()
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            stats = _batch_stats(x, out, losses)
            dead_window = min(done * cfg.batch_size, 1_000_000)
            stats.update(step=done, tokens=done * cfg.batch_size, lr=lr_at(step, cfg, base_lr),
                         dead_frac=(tokens_since_fired >= dead_window).float().mean().item(),
                         elapsed_s=time.perf_counter() - started)
            history.append(stats)
            bar.set_postfix(loss=f"{stats['loss']:.4g}", fvu=f"{stats['fvu']:.3f}", l0=f"{stats['l0']:.1f}")
        if run_dir is not None and (done == cfg.steps or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0)):
            state = TrainState(done, time.perf_counter() - started, history, tokens_since_fired)
            save_checkpoint(run_dir / CHECKPOINT_FILE, sae, opt, state, cfg.to_dict())
    bar.close()
    return TrainState(cfg.steps, time.perf_counter() - started, history, tokens_since_fired)


def optimizer_for(sae: SparseAutoencoder, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam over every parameter, row-sparse where the gradients are (``sparse_updates``), the
    decoder's rows kept at unit norm in the same pass (:class:`LazyAdam`, ``sae.param_groups``)."""
    return LazyAdam(sae.param_groups(), lr=0.0, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def train(
    sae_cfg: SAEConfig,
    source: Batches,
    cfg: TrainConfig = TrainConfig(),
    run_dir: str | Path | None = None,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
) -> SparseAutoencoder:
    """Train an SAE of ``sae_cfg`` on ``source``; with ``run_dir``, checkpoint and save it there.

    ``resume`` continues a killed run from its last checkpoint and ends in exactly the state an
    uninterrupted run would have reached. A run folder that already holds a checkpoint or
    trained weights is never overwritten unless ``force``.
    """
    if cfg.sparse_updates and not reads_setting(sae_cfg.arch, "sparse_updates"):
        raise ValueError(f"sparse updates need a sparse code; {sae_cfg.arch} is dense "
                         f"(use one of {', '.join(SETTING_ARCHS['sparse_updates'])})")
    run_dir = Path(run_dir) if run_dir is not None else None
    start, resumed_cfg = 0, None
    if run_dir is not None and resume:
        start, resumed_cfg = _resume_point(run_dir, sae_cfg, cfg)
    elif run_dir is not None:
        _claim_run_dir(run_dir, force)
    sae = build_sae(resumed_cfg) if resumed_cfg is not None else _initialise(sae_cfg, cfg, batch_stream(source, cfg, 0))
    sae.to(cfg.device)
    sae.matmul_dtype = getattr(torch, cfg.matmul_dtype)
    sae.sparse_grads = cfg.sparse_updates
    state = train_loop(sae, batch_stream(source, cfg, start), cfg, TrainState(start), run_dir, progress)
    if run_dir is not None:
        save_sae(sae, run_dir)
        write_json_atomic(run_dir / TRAIN_CFG_FILE, cfg.to_dict())
        (run_dir / "log.jsonl").write_text("".join(json.dumps(h) + "\n" for h in state.history or []))
    return sae


def _initialise(sae_cfg: SAEConfig, cfg: TrainConfig, batches: Iterator[Tensor]) -> SparseAutoencoder:
    """Seeded init; the first batch sets the normalisation constant and the geometric-median biases."""
    sample = next(batches)
    if cfg.normalize:
        sae_cfg = sae_cfg.replace(act_scale=activation_scale(sample))
    sae = build_sae(sae_cfg)
    sae.reset_parameters(torch.Generator().manual_seed(cfg.seed))
    sae.init_from_data(sample)
    return sae


def settings_differ(saved_sae: dict, saved_train: dict, sae_cfg: SAEConfig, cfg: TrainConfig) -> list[str]:
    """Names of the settings in which a saved run differs from ``sae_cfg``/``cfg``.

    ``act_scale`` is left out: a run computes it itself from its first batch. A setting the saved
    run does not name (it predates the field) counts as the field's default, which by rule is
    the behaviour from before the field existed.
    """
    saved_sae = SAEConfig.from_dict(saved_sae).to_dict()
    saved_train = {**TrainConfig().to_dict(), **saved_train}
    differs = [key for key, value in sae_cfg.to_dict().items() if key != "act_scale" and saved_sae.get(key) != value]
    return sorted(differs + [key for key, value in cfg.to_dict().items() if saved_train.get(key) != value])


def _resume_point(run_dir: Path, sae_cfg: SAEConfig, cfg: TrainConfig) -> tuple[int, SAEConfig]:
    """The checkpointed step and SAE config, after checking the run being continued is this one."""
    meta = read_checkpoint_meta(run_dir / CHECKPOINT_FILE)
    saved_sae = json.loads(meta["sae_cfg"])
    differs = settings_differ(saved_sae, json.loads(meta["train_cfg"]), sae_cfg, cfg)
    if differs:
        raise ValueError(f"cannot resume {run_dir}: settings differ from the checkpoint in {differs}")
    return int(meta["step"]), SAEConfig.from_dict(saved_sae)


def _claim_run_dir(run_dir: Path, force: bool) -> None:
    """Apply the never-overwrite rule: a folder holding a run is only cleared with ``force``."""
    outputs = [run_dir / name for name in RUN_OUTPUTS]
    if any(path.exists() for path in outputs):
        if not force:
            raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it or --force to overwrite it")
        for path in outputs:
            path.unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
