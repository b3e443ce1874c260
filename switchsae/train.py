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
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from torch import Tensor
from tqdm.auto import tqdm

from switchsae.checkpoint import (CHECKPOINT_FILE, TrainState, load_checkpoint, read_checkpoint_meta, save_checkpoint,
                                  saved_activations)
from switchsae.config import LEGACY_TRAIN_DEFAULTS, SAEConfig, TrainConfig, default_lr
from switchsae.distributed.expert_parallel import EXPERT_PARAMS
from switchsae.distributed.group import DistributedError
from switchsae.distributed.world import SINGLE, World
from switchsae.kernels.autotune import resolve_matmul_dtype
from switchsae.memory import reuse_freed_memory
from switchsae.optim import LazyAdam, clip_scale
from switchsae.run_folder import RunClaim
from switchsae.saes import REGISTRY, SETTING_ARCHS, SparseAutoencoder, build_sae, reads_setting
from switchsae.saes.io import CFG_FILE, LEGACY_CFG_FILE, LEGACY_WEIGHTS_FILE, WEIGHTS_FILE, save_sae, write_json_atomic
from switchsae.sources.activations import ActivationSource, Shuffle, TensorSource, source_identity

Batches = ActivationSource | Tensor | Iterable[Tensor]


TRAIN_CFG_FILE = "train_config.json"
#: what a run writes (and the legacy names of runs saved before the rename): --force clears them all
RUN_OUTPUTS = (CHECKPOINT_FILE, WEIGHTS_FILE, CFG_FILE, TRAIN_CFG_FILE, "log.jsonl", "metrics.json",
               LEGACY_WEIGHTS_FILE, LEGACY_CFG_FILE)


class TrainingDiverged(RuntimeError):
    """The loss stopped meaning anything (see :class:`DivergenceGuard`); the last checkpoint,
    written before it happened, is left untouched."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message says what the run leaves behind."""


#: a run stops once its loss exceeds this multiple of the lowest running average it reached
LOSS_GROWTH_LIMIT = 1e4


class DivergenceGuard:
    """Stops a run whose loss has diverged: a loss term that is NaN or infinite, or a total loss
    above ``LOSS_GROWTH_LIMIT`` times the lowest value its running average (an exponential moving
    average over ~10 steps, so one easy batch does not lower the bar) has reached.

    The rule is relative because no absolute bound fits every run: the loss is in the
    activations' units, and untrained Gated and JumpReLU SAEs start at FVU far above 1e3
    (measured: 6.6e4 at M/d = 512). A healthy run's loss falls from its start and never rises
    1e4-fold; one at a hopeless learning rate (``--lr 1e6``) passes 1e20 within a few steps.
    Before each checkpoint the weights about to be saved are checked on the step's batch too
    (:meth:`check_weights`), so a checkpoint never holds weights that have already diverged.
    """

    smoothing = 0.9

    def __init__(self, lr: float, world: World = SINGLE):
        self.lr, self.world = lr, world
        self.average: float | None = None
        self.lowest, self.lowest_step = math.inf, 0

    def check(self, step: int, losses: dict[str, Tensor], track: bool = True) -> None:
        """Raise :class:`TrainingDiverged` if the loss terms of ``step`` (of the whole batch: averaged
        over the ranks, so that all stop together) have diverged; with ``track``, fold the loss into
        the running average."""
        losses = self.world.mean(losses)
        values = dict(zip(losses, torch.stack([v.detach().float() for v in losses.values()]).tolist()))
        loss, terms = values["loss"], ", ".join(f"{name}={value:.4g}" for name, value in values.items())
        parts = {name: value for name, value in values.items() if name != "loss"}
        if not math.isfinite(loss):
            bad = [name for name, value in parts.items() if not math.isfinite(value)] or ["loss"]
            named = " and ".join((", ".join(bad[:-1]), bad[-1])) if len(bad) > 1 else bad[0]
            raise TrainingDiverged(f"training diverged at step {step}: {named} not finite ({terms}) "
                                   f"at lr {self.lr:.3g}")
        if loss > LOSS_GROWTH_LIMIT * self.lowest:
            largest = max(parts, key=parts.__getitem__, default="loss")
            raise TrainingDiverged(
                f"training diverged at step {step}: the loss is {loss / self.lowest:.3g} times its lowest running "
                f"average ({self.lowest:.4g}, step {self.lowest_step}), mostly {largest} ({terms}) at lr {self.lr:.3g}")
        if track:
            self.average = loss if self.average is None else self.smoothing * self.average + (1 - self.smoothing) * loss
            if self.average < self.lowest:
                self.lowest, self.lowest_step = self.average, step

    def check_weights(self, sae: SparseAutoencoder, x: Tensor, step: int, token_ids: Tensor | None = None) -> None:
        """:meth:`check` on the loss of batch ``x`` under the current weights, computed in eval mode
        without gradients, so nothing the next step or a resume reads changes."""
        with sae.inference(), torch.no_grad():
            losses = sae.loss(x, sae(x, token_ids=token_ids))
        self.check(step, losses, track=False)


def lr_at(step: int, cfg: TrainConfig, base_lr: float) -> float:
    """Constant ``base_lr``, then linear decay to zero over the last ``lr_decay_frac`` of steps."""
    decay_steps = int(cfg.steps * cfg.lr_decay_frac)
    decay_start = cfg.steps - decay_steps
    if step < decay_start or decay_steps == 0:
        return base_lr
    return base_lr * (cfg.steps - step) / decay_steps


def batch_stream(source: Batches, cfg: TrainConfig, start_step: int, token_ids: bool = False) -> Iterator[Tensor]:
    """Training batches from step ``start_step`` on; with ``token_ids``, ``(batch, ids)`` pairs
    (the source must store them: an activation cache).

    A plain iterable has no notion of steps: it must replay the same stream each time it is
    iterated, and the first ``start_step`` batches are skipped on resume.
    """
    if isinstance(source, Tensor):
        source = TensorSource(source)
    check_token_ids(source, token_ids)
    if isinstance(source, ActivationSource):
        shuffle = Shuffle(cfg.shuffle_buffer_mb << 20, cfg.shuffle_chunk_mb << 20)
        return source.train_batches(cfg.batch_size, cfg.seed, start_step, token_ids=token_ids, shuffle=shuffle)
    return itertools.islice(iter(source), start_step, None)


def check_token_ids(source: Batches, needed: bool) -> None:
    """Refuse a source without stored token ids for an SAE that routes by them."""
    if needed and not getattr(source, "has_token_ids", False):
        raise ValueError("this SAE routes by token id (hash routing), so it needs activations with stored token "
                         "ids: an activation cache built by `switchsae cache`; these activations have none.")


def split_batch(batch: Tensor | tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor | None]:
    """``(x, token ids or None)`` of a batch that may carry its rows' token ids."""
    return batch if isinstance(batch, tuple) else (batch, None)



def activation_scale(x: Tensor) -> float:
    """The constant ``c`` with ``mean ‖c·x‖ = sqrt(d)`` (SAELens / dictionary_learning convention)."""
    return math.sqrt(x.shape[1]) / x.float().norm(dim=1).mean().item()


def _batch_stats(x: Tensor, out, losses: dict[str, Tensor], world: World) -> dict[str, float]:
    """The loss terms, FVU and L0 of the whole batch: sums over every rank's tokens, then divided."""
    x = x.float()
    d = x.shape[1]
    sums = world.total(torch.cat([x.sum(0), torch.stack([(x - out.x_hat).pow(2).sum(), out.latents.l0().float().sum(),
                                                         torch.tensor(float(x.shape[0]), device=x.device)])]))
    tokens = sums[d + 2]
    var = world.total((x - sums[:d] / tokens).pow(2).sum()).clamp_min(1e-12)
    stats = {name: value.item() for name, value in world.mean(losses).items()}
    stats.update(fvu=(sums[d] / var).item(), l0=(sums[d + 1] / tokens).item())
    return stats


def train_loop(
    sae: SparseAutoencoder,
    batches: Iterator[Tensor],
    cfg: TrainConfig,
    state: TrainState,
    run_dir: Path | None = None,
    progress: bool = True,
    on_checkpoint: Callable[[int], None] | None = None,
    world: World = SINGLE,
    activations: dict[str, str] | None = None,
) -> TrainState:
    """Run steps ``state.step .. cfg.steps - 1``; checkpoint to ``run_dir`` every ``checkpoint_every``
    (then call ``on_checkpoint(step)``; ``activations``, what the batches are, is recorded in the
    checkpoint); stop with :class:`TrainingDiverged` (:class:`DivergenceGuard`).
    On several ranks (``world``, switchsae/distributed) ``batches`` are this rank's shards, gradients
    are averaged after the backward and rank 0 writes the checkpoints."""
    base_lr = cfg.lr or default_lr(sae.cfg.width if cfg.lr_width == "total" else sae.cfg.expert_width)
    opt = optimizer_for(sae, cfg)
    if run_dir is not None and state.step > 0:
        state = load_checkpoint(run_dir / CHECKPOINT_FILE, sae, opt, world)
    history = state.history or []
    device = sae.W_dec.device
    if device.type == "cpu":
        reuse_freed_memory()
    tokens_since_fired = state.tokens_since_fired
    if tokens_since_fired is None:
        tokens_since_fired = torch.zeros(sae.cfg.width, dtype=torch.long)
    sae.tokens_since_fired = tokens_since_fired.to(device)
    bar = tqdm(total=cfg.steps, initial=state.step, disable=not (progress and world.writes),
               desc=f"train {sae.cfg.arch}", unit="step")
    started = time.perf_counter() - state.elapsed_s
    guard = DivergenceGuard(base_lr, world)
    for step in range(state.step, cfg.steps):
        x, token_ids = split_batch(next(batches))
        x = x.to(device, non_blocking=True)
        out = sae(x, token_ids=None if token_ids is None else token_ids.to(device))
        losses = sae.loss(x, out)
        guard.check(step, losses)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        world.reduce_gradients(sae)
        prepare_step(opt, sae, cfg, lr_at(step, cfg, base_lr), world)
        opt.step()
        sae.record_firing(out.latents, x.shape[0])
        bar.update()
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            stats = {**_batch_stats(x, out, losses, world), **world.mean_values(sae.batch_stats(out)),
                     **world.parallel_stats()}
            dead_window = min(done * cfg.batch_size, 1_000_000)
            stats.update(step=done, tokens=done * cfg.batch_size, lr=lr_at(step, cfg, base_lr),
                         dead_frac=(sae.tokens_since_fired >= dead_window).float().mean().item(),
                         elapsed_s=time.perf_counter() - started)
            history.append(stats)
            bar.set_postfix(loss=f"{stats['loss']:.4g}", fvu=f"{stats['fvu']:.3f}", l0=f"{stats['l0']:.1f}")
        if run_dir is not None and (done == cfg.steps or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0)):
            guard.check_weights(sae, x, done, None if token_ids is None else token_ids.to(device))
            state = TrainState(done, time.perf_counter() - started, history, sae.tokens_since_fired)
            save_checkpoint(run_dir / CHECKPOINT_FILE, sae, opt, state, cfg.to_dict(), world, activations)
            if on_checkpoint is not None:
                on_checkpoint(done)
    bar.close()
    final = TrainState(cfg.steps, time.perf_counter() - started, history, sae.tokens_since_fired)
    sae.tokens_since_fired = None
    return final


def prepare_step(opt: torch.optim.Optimizer, sae: SparseAutoencoder, cfg: TrainConfig, lr: float,
                 world: World = SINGLE) -> None:
    """Before each optimizer step: this step's ``lr``, and with ``grad_clip`` the factor that clips
    the (reduced) gradient's global norm to it, applied inside the update (``grad_scale``)."""
    scale = clip_scale(cfg.grad_clip, world.gradient_norm(sae)) if cfg.grad_clip else 1.0
    for group in opt.param_groups:
        group["lr"], group["grad_scale"] = lr, scale


def optimizer_for(sae: SparseAutoencoder, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam over every parameter, row-sparse where the gradients are (``sparse_updates``), the
    decoder's rows kept at unit norm in the same pass, the matrices' moments in ``adam_moments``
    (:class:`LazyAdam`, ``sae.param_groups``; an expert-parallel rank's expert rows rounded as
    the same rows of one process's matrices)."""
    ep = getattr(sae, "expert_parallel", None)
    key_rows = {} if ep is None else {getattr(sae, name): ep.global_ids(torch.arange(getattr(sae, name).shape[0]))
                                      for name in EXPERT_PARAMS}
    return LazyAdam(sae.param_groups(), lr=0.0, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, moments=cfg.adam_moments,
                    key_rows=key_rows)


def train(
    sae_cfg: SAEConfig,
    source: Batches,
    cfg: TrainConfig = TrainConfig(),
    run_dir: str | Path | None = None,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    world: World = SINGLE,
) -> SparseAutoencoder:
    """Train an SAE of ``sae_cfg`` on ``source``; with ``run_dir``, checkpoint and save it there.

    ``resume`` continues a killed run from its last checkpoint and ends in exactly the state an
    uninterrupted run would have reached. The run folder is locked, checked writable before the
    first step, and a run already in it is never overwritten unless ``force``; a forced run
    replaces it only once it has written its first checkpoint (:mod:`switchsae.run_folder`).
    A diverged run raises :class:`TrainingDiverged`, Ctrl-C :class:`TrainingInterrupted`; both
    messages say what the run leaves behind.

    On several ranks (``world``: every rank calls this with the same arguments) each trains on its
    shard of every batch and the result is the one-process run's on the whole batch
    (switchsae/distributed); rank 0 claims the run folder and writes it, and a rank that stops
    or stalls stops the others with :class:`DistributedError` within the process-group timeout.
    """
    run_dir = Path(run_dir) if run_dir is not None else None
    source = TensorSource(source) if isinstance(source, Tensor) else source  # checked for NaN once
    world.check_start({"sae": sae_cfg.to_dict(), "train": cfg.to_dict(), "run_dir": str(run_dir), "resume": resume,
                       "force": force}, sae_cfg, cfg.batch_size)
    world.agreed(lambda: _check_runnable(sae_cfg, source, cfg))
    with world.claim(run_dir, RUN_OUTPUTS, CHECKPOINT_FILE, resume=resume, force=force) as claim:
        try:
            sae, state = _train_claimed(claim, sae_cfg, source, cfg, resume, progress, world)
            if run_dir is not None and world.writes:
                save_sae(sae, run_dir)
                write_json_atomic(run_dir / TRAIN_CFG_FILE, cfg.to_dict())
                (run_dir / "log.jsonl").write_text("".join(json.dumps(h) + "\n" for h in state.history or []))
        except TrainingDiverged as err:
            raise TrainingDiverged(f"{err}; {claim.outcome()}") from None
        except KeyboardInterrupt:
            raise TrainingInterrupted(claim.outcome()) from None
        except DistributedError as err:
            failure = DistributedError(f"{err}; {claim.outcome()}")
            failure.reported_elsewhere = err.reported_elsewhere
            raise failure from None
    return sae


def _check_runnable(sae_cfg: SAEConfig, source: Batches, cfg: TrainConfig) -> None:
    """Refuse settings this run cannot train with, before any work."""
    if cfg.sparse_updates and not reads_setting(sae_cfg.arch, "sparse_updates"):
        raise ValueError(f"sparse updates need a sparse code; {sae_cfg.arch} is dense "
                         f"(use one of {', '.join(SETTING_ARCHS['sparse_updates'])})")
    check_device(cfg.device)
    check_token_ids(source, REGISTRY[sae_cfg.arch].token_ids_needed(sae_cfg))


def _train_claimed(claim: RunClaim, sae_cfg: SAEConfig, source: Batches, cfg: TrainConfig, resume: bool,
                   progress: bool, world: World) -> tuple[SparseAutoencoder, TrainState]:
    """Build (or reload) the SAE and run the loop in the claimed run folder; on several ranks,
    rank 0 initialises and decides the matmul dtype, and the others follow (``world``)."""
    start, resumed_cfg, matmul_dtype = 0, None, None
    identity = source_identity(source)
    run_dir = claim.run_dir
    if run_dir is not None and resume:
        start, resumed_cfg, matmul_dtype = world.agreed(lambda: _resume_point(run_dir, sae_cfg, cfg, identity))
        claim.checkpointed(start)
    if resumed_cfg is not None:
        sae = build_sae(resumed_cfg)
    else:
        sae = world.initialised(lambda: _initialise(sae_cfg, cfg, batch_stream(source, cfg, 0)))
    sae.to(cfg.device)
    sae.matmul_dtype = getattr(torch, matmul_dtype or world.decided(lambda: _matmul_dtype(sae.cfg.arch, cfg, progress)))
    sae.sparse_grads = cfg.sparse_updates
    world.prepare(sae, broadcast=resumed_cfg is None)
    batches = world.batches(batch_stream(source, cfg, start, sae.needs_token_ids))
    state = train_loop(sae, batches, cfg, TrainState(start), claim.run_dir, progress, on_checkpoint=claim.checkpointed,
                       world=world, activations=identity)
    return world.finished(sae), state


def _matmul_dtype(arch: str, cfg: TrainConfig, progress: bool) -> str:
    """The selection matmul's dtype for a new run: float32 where the architecture has no selection
    matmul, else ``cfg.matmul_dtype`` with ``auto`` resolved (and the choice printed with ``progress``)."""
    if not reads_setting(arch, "matmul_dtype"):
        return "float32"
    dtype, reason = resolve_matmul_dtype(cfg.matmul_dtype, cfg.device)
    if cfg.matmul_dtype == "auto" and progress:
        print(f"switchsae: --matmul-dtype auto chose {dtype} ({reason})", file=sys.stderr)
    return dtype


def check_device(device: str) -> None:
    """Fail before any work when this torch cannot train on ``device``."""
    if not device.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        why = "this torch build has no CUDA support" if torch.version.cuda is None else "torch sees no CUDA GPU"
        raise ValueError(f"device {device!r} needs a CUDA GPU, but {why} (torch {torch.__version__}); "
                         "use --device cpu or install a CUDA build of torch")
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r} does not exist: torch sees {torch.cuda.device_count()} CUDA GPU(s)")


def _initialise(sae_cfg: SAEConfig, cfg: TrainConfig, batches: Iterator[Tensor]) -> SparseAutoencoder:
    """Seeded init; the first batch sets the normalisation constant and the geometric-median biases."""
    sample, _ = split_batch(next(batches))
    scale = activation_scale(sample)
    sae_cfg = sae_cfg.replace(unit_scale=scale, act_scale=scale if cfg.normalize else sae_cfg.act_scale)
    sae = build_sae(sae_cfg)
    sae.reset_parameters(torch.Generator().manual_seed(cfg.seed))
    sae.init_from_data(sample)
    return sae


def settings_differ(saved_sae: dict, saved_train: dict, sae_cfg: SAEConfig, cfg: TrainConfig) -> list[str]:
    """Names of the settings in which a saved run differs from ``sae_cfg``/``cfg``.

    ``act_scale`` and ``unit_scale`` are left out: a run computes them from its first batch. A setting the saved
    run does not name (it predates the field) counts as the behaviour from before the field
    existed: the field's default, or its old default where that changed (``LEGACY_TRAIN_DEFAULTS``).
    ``matmul_dtype = "auto"`` matches any saved value: the saved run resolved it when it started, and a resume reuses that choice.
    """
    saved_sae = SAEConfig.from_dict(saved_sae).flat()
    saved_train = {**TrainConfig().to_dict(), **LEGACY_TRAIN_DEFAULTS, **saved_train}
    differs = [key for key, value in sae_cfg.flat().items() if key not in ("act_scale", "unit_scale")
               and saved_sae.get(key) != value]
    return sorted(differs + [key for key, value in cfg.to_dict().items() if saved_train.get(key) != value
                             and (key, value) != ("matmul_dtype", "auto")])


def _resume_point(run_dir: Path, sae_cfg: SAEConfig, cfg: TrainConfig,
                  activations: dict[str, str] | None) -> tuple[int, SAEConfig, str]:
    """The checkpointed step, SAE config and selection matmul dtype (as resolved when the run
    started: a resume never measures again), after checking the run being continued is this one,
    on the same ``activations`` (where both the checkpoint and the source say what they are)."""
    meta = read_checkpoint_meta(run_dir / CHECKPOINT_FILE)
    saved_sae, saved_train = json.loads(meta["sae_cfg"]), json.loads(meta["train_cfg"])
    differs = settings_differ(saved_sae, saved_train, sae_cfg, cfg)
    if differs:
        raise ValueError(f"cannot resume {run_dir}: settings differ from the checkpoint in {differs}")
    saved = saved_activations(meta)
    if saved is not None and activations is not None and saved["fingerprint"] != activations["fingerprint"]:
        raise ValueError(f"cannot resume {run_dir}: it was trained on other activations ({saved['description']}) "
                         f"than these ({activations['description']}); resume it on the same activations")
    matmul_dtype = meta.get("matmul_dtype") or saved_train.get("matmul_dtype", "float32")  # older: as requested
    return int(meta["step"]), SAEConfig.from_dict(saved_sae), matmul_dtype
