"""Run settings as small frozen dataclasses: one per stage, one place for defaults.

Each field carries a one-line help text (``opt(default, help)``) that is also its ``--help`` in the CLI.
Validation happens in ``__post_init__`` and fails with a full sentence naming the problem.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from switchsae.sources.activations import DEFAULT_SHUFFLE

ARCHS = ("switch", "topk", "batchtopk", "relu", "gated", "jumprelu")
ROUTERS = ("top1", "top_e", "expert_choice", "hash", "sinkhorn")
TOPK_FAMILY = ("switch", "topk", "batchtopk")
ADAM_MOMENTS = ("fp32", "bf16")
L1_FAMILY = ("relu", "gated", "jumprelu")


def opt(default: Any = MISSING, help: str = "") -> Any:
    """A dataclass field with a help text (read by the CLI)."""
    return field(default=default, metadata={"help": help})



def require_positive(settings: Any, *names: str) -> None:
    """ValueError naming the first of ``names`` whose value on ``settings`` is below 1."""
    for name in names:
        if getattr(settings, name) < 1:
            raise ValueError(f"{name} must be a positive integer, got {getattr(settings, name)}.")


def require_non_negative(settings: Any, *names: str) -> None:
    """ValueError naming the first of ``names`` whose value on ``settings`` is below 0."""
    for name in names:
        if getattr(settings, name) < 0:
            raise ValueError(f"{name} must be non-negative, got {getattr(settings, name)}.")

@dataclass(frozen=True)
class RoutingConfig:
    """How a Switch SAE routes tokens to experts (saes/routing.py); the saved config keeps it under ``routing``."""

    router: str = opt("top1", "routing strategy: top1 (the paper), top_e (e experts, one TopK over their latents), "
                              "expert_choice, hash (by token id), sinkhorn (balanced in training, top1 at inference)")
    experts_per_token: int = opt(1, "e: experts each token is routed to (top_e)")
    shared_expert: bool = opt(False, "add one always-on expert of the same width beside the routed ones")
    capacity_factor: float = opt(1.0, "expert_choice: each expert takes capacity_factor * T / N tokens of a batch")
    aux_coeff: float = opt(3.0, "load-balancing weight alpha (top1, top_e)")
    z_loss_coeff: float = opt(1e-3, "router z-loss weight: mean(logsumexp(logits)^2), on learned routers (all but "
                                    "hash); 0 turns it off (the default of runs saved before the routing settings)")
    aux_units: str = opt("data", "what alpha and the z-loss weight are relative to: data (the MSE of activations "
                                 "scaled to mean norm sqrt(d), with or without --normalize) or loss (the MSE in the "
                                 "units the loss is computed in: raw, or normalised under --normalize; before 0.2)")

    def __post_init__(self) -> None:
        if self.router not in ROUTERS:
            raise ValueError(f"Unknown router {self.router!r}; choose one of {', '.join(ROUTERS)}.")
        if self.experts_per_token < 1:
            raise ValueError(f"experts_per_token must be a positive integer, got {self.experts_per_token}.")
        if self.experts_per_token > 1 and self.router != "top_e":
            raise ValueError(f"experts_per_token={self.experts_per_token} needs router top_e, not {self.router}.")
        if not (self.capacity_factor > 0 and math.isfinite(self.capacity_factor)):
            raise ValueError(f"capacity_factor must be a positive number, got {self.capacity_factor}.")
        if self.aux_coeff < 0 or self.z_loss_coeff < 0:
            raise ValueError("aux_coeff and z_loss_coeff must be non-negative.")
        if self.aux_units not in ("data", "loss"):
            raise ValueError(f"aux_units must be data or loss, got {self.aux_units!r}.")


ROUTING_FIELDS = tuple(f.name for f in fields(RoutingConfig))


@dataclass(frozen=True)
class SAEConfig:
    """What an SAE is: everything needed to rebuild it from its saved config (switchsae/saes/io.py)."""

    arch: str = opt(help="architecture: one of switch, topk, batchtopk, relu, gated, jumprelu")
    d_model: int = opt(help="width d of the activations (the model's hidden size)")
    width: int = opt(help="total number of latents M (for Switch: summed over all experts)")
    k: int = opt(32, "active latents per token (TopK family)")
    n_experts: int = opt(1, "number of experts N (Switch only)")
    l1_coeff: float = opt(5.0, "sparsity coefficient lambda (ReLU, Gated: L1; JumpReLU: L0)")
    routing: RoutingConfig = opt(RoutingConfig(), "how a Switch SAE routes tokens (RoutingConfig)")
    encoder_bias: bool = opt(False, "TopK, BatchTopK: a learned encoder bias b_enc added to every latent's "
                                    "pre-activation (SAELens's TopK has one; trains through the unfused path)")
    auxk_coeff: float = opt(0.0, "AuxK weight: dead latents reconstruct the residual (Gao et al.; TopK family)")
    auxk_k: int = opt(256, "AuxK: dead latents per token (within its own experts for Switch)")
    dead_tokens: int = opt(262_144, "AuxK: a latent is dead after this many training tokens without firing")
    jump_threshold: float = opt(0.001, "JumpReLU: initial threshold theta of every latent")
    jump_bandwidth: float = opt(0.001, "JumpReLU: bandwidth epsilon of the straight-through estimator")
    act_scale: float = opt(1.0, "constant the raw activations are multiplied by before encoding (undone on decode)")
    unit_scale: float = opt(1.0, "the constant c with mean |c x| = sqrt(d) on the first training batch (also without "
                                 "normalisation): auxiliary weights are relative to the MSE of c x")
    hook_name: str = opt("", "hook point the activations come from, e.g. blocks.10.hook_resid_post")
    model_name: str = opt("", "language model the activations come from")

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"Unknown architecture {self.arch!r}; choose one of {', '.join(ARCHS)}.")
        require_positive(self, "d_model", "width", "k", "n_experts")
        if self.arch == "switch":
            if self.width % self.n_blocks:
                raise ValueError(f"width {self.width} is not divisible by the {self.n_blocks} experts"
                                 f"{' (shared one included)' if self.routing.shared_expert else ''}.")
            if self.k > self.expert_width:
                raise ValueError(f"k={self.k} exceeds the width of one expert ({self.expert_width} latents).")
            if self.routing.experts_per_token > self.n_experts:
                raise ValueError(f"experts_per_token={self.routing.experts_per_token} exceeds n_experts "
                                 f"{self.n_experts}.")
        elif self.n_experts != 1:
            raise ValueError(f"n_experts applies only to the switch architecture, not {self.arch}.")
        elif self.routing != RoutingConfig():
            changed = [name for name in ROUTING_FIELDS if getattr(self.routing, name) != getattr(RoutingConfig(), name)]
            raise ValueError(f"routing settings ({', '.join(changed)}) apply only to the switch architecture, "
                             f"not {self.arch}.")
        if self.encoder_bias and self.arch not in ("topk", "batchtopk"):
            raise ValueError(f"encoder_bias applies only to the topk and batchtopk architectures, not {self.arch}.")
        if self.auxk_coeff and self.arch not in TOPK_FAMILY:
            raise ValueError(f"auxk_coeff needs a TopK code ({', '.join(TOPK_FAMILY)}); {self.arch} has none.")
        if self.auxk_coeff < 0 or self.auxk_k < 1 or self.dead_tokens < 1:
            raise ValueError("auxk_coeff must be non-negative, auxk_k and dead_tokens positive.")
        if self.arch in TOPK_FAMILY and self.k > self.width:
            raise ValueError(f"k={self.k} exceeds the width {self.width}.")
        for name in ("act_scale", "unit_scale"):
            if not (getattr(self, name) > 0 and math.isfinite(getattr(self, name))):
                raise ValueError(f"{name} must be a positive finite number, got {getattr(self, name)}.")
        if self.l1_coeff < 0:
            raise ValueError("l1_coeff must be non-negative.")
        if not (self.jump_threshold > 0 and self.jump_bandwidth > 0):
            raise ValueError("jump_threshold and jump_bandwidth must be positive.")

    @property
    def n_blocks(self) -> int:
        """Expert blocks of latents: the N routed experts, plus the shared one if there is one."""
        return self.n_experts + int(self.routing.shared_expert)

    @property
    def expert_width(self) -> int:
        """Latents per expert, M/N (M/(N+1) with a shared expert)."""
        return self.width // self.n_blocks

    def replace(self, **changes: Any) -> "SAEConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_flat(cls, **settings: Any) -> "SAEConfig":
        """Build from one flat namespace of settings (CLI flags, sweep keys): routing fields go to ``routing``."""
        routing = {key: settings.pop(key) for key in ROUTING_FIELDS if key in settings}
        return cls(**settings, routing=RoutingConfig(**routing))

    def flat(self) -> dict[str, Any]:
        """The settings as one flat dict (routing fields beside the others), as :meth:`from_flat` takes them."""
        data = self.to_dict()
        return {**data.pop("routing"), **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SAEConfig":
        """Rebuild from a saved config; unknown or missing required keys are an error, never ignored.

        Files from before routing had its own place name ``aux_coeff`` at the top level, were
        trained with the auxiliary weights relative to the MSE in the loss's own units (``aux_units``)
        and had no router z-loss; a file with routing settings names every one of them. A non-Switch
        SAE's file holds the routing defaults of the version that wrote it, which configure nothing:
        they are dropped, so that a later change of a routing default cannot make it unloadable."""
        data = dict(data)
        routing = dict(data.pop("routing", {}))
        if "aux_coeff" in data:
            routing["aux_coeff"] = data.pop("aux_coeff")
        routing.setdefault("aux_units", "loss")
        routing.setdefault("z_loss_coeff", 0.0)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known) + sorted(f"routing.{key}" for key in set(routing) - set(ROUTING_FIELDS))
        if unknown:
            raise ValueError(f"the SAE config has unknown fields {unknown}; it was written by another version or tool.")
        return cls(**data, routing=RoutingConfig(**routing) if data.get("arch") == "switch" else RoutingConfig())


#: every SAE setting's default in the flat namespace of :meth:`SAEConfig.flat` (required ones absent)
FLAT_DEFAULTS = {f.name: f.default for f in (*fields(SAEConfig), *fields(RoutingConfig))
                 if f.default is not MISSING and f.name != "routing"}


@dataclass(frozen=True)
class TrainConfig:
    """How to train: schedule, batches, checkpoints."""

    steps: int = opt(1000, "number of optimizer steps")
    batch_size: int = opt(4096, "activations per step (the paper uses 8192)")
    lr: float | None = opt(None, "learning rate; default (None) is Gao et al.'s law 2e-4 / sqrt(M / 2^14)")
    lr_width: str = opt("expert", "width M the default lr law uses for a Switch SAE: expert (M/N) or total (the paper)")
    lr_decay_frac: float = opt(0.2, "fraction of steps at the end over which the learning rate decays linearly to zero")
    beta1: float = opt(0.9, "Adam beta1")
    beta2: float = opt(0.999, "Adam beta2")
    eps: float = opt(1e-8, "Adam epsilon")
    seed: int = opt(0, "seed for initialisation and batch order")
    checkpoint_every: int = opt(500, "write a checkpoint every this many steps (0: only at the end)")
    log_every: int = opt(50, "log losses every this many steps")
    normalize: bool = opt(False, "rescale activations so that their mean norm is sqrt(d_model) (factor stored in the SAE config)")
    sparse_updates: bool = opt(False, "row-sparse gradients and lazy Adam: update only the latents a batch used (TopK family)")
    grad_clip: float = opt(1.0, "clip the gradient's global norm (over every parameter, after the ranks' average) to "
                                "this before each step, as dictionary_learning and SAELens do; 0: no clipping")
    adam_moments: str = opt("fp32", "dtype of Adam's moments of the weight matrices: fp32, or bf16 (12 instead of 16 "
                                    "bytes of training state per parameter; updated in fp32, stored with "
                                    "stochastic rounding; biases keep fp32)")
    shuffle_buffer_mb: int = opt(DEFAULT_SHUFFLE.buffer_bytes >> 20,
                                 "MiB of activation-cache rows read into memory and mixed at a time by the training stream")
    shuffle_chunk_mb: int = opt(DEFAULT_SHUFFLE.chunk_bytes >> 20,
                                "an activation cache's training rows reach each shuffle buffer in chunks of this many MiB "
                                "drawn from anywhere in the cache; 0: whole shards (the stream of runs saved before this "
                                "setting; a corpus stored book after book then trains in blocks of books)")
    device: str = opt("cpu", "where to train: cpu, cuda or cuda:N (batches are moved there; checkpoints stay portable)")
    matmul_dtype: str = opt("auto", "dtype of the TopK family's selection matmul: float32, bfloat16 or auto (the faster "
                                    "on this machine, measured once; values and gradients stay fp32)")

    def __post_init__(self) -> None:
        require_positive(self, "steps", "batch_size", "log_every")
        if self.lr is not None and not 0 < self.lr < math.inf:
            raise ValueError(f"lr must be a positive finite number, got {self.lr}.")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"Adam's {name} must lie in [0, 1), got {getattr(self, name)}.")
        if not 0 < self.eps < math.inf:
            raise ValueError(f"Adam's eps must be a positive finite number, got {self.eps}.")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed}.")
        if self.lr_width not in ("total", "expert"):
            raise ValueError(f"lr_width must be total or expert, got {self.lr_width!r}.")
        if not 0 <= self.lr_decay_frac <= 1:
            raise ValueError(f"lr_decay_frac must lie in [0, 1], got {self.lr_decay_frac}.")
        if not 0 <= self.grad_clip < math.inf:
            raise ValueError(f"grad_clip must be 0 (off) or a positive finite norm, got {self.grad_clip}.")
        if self.adam_moments not in ADAM_MOMENTS:
            raise ValueError(f"adam_moments must be one of {', '.join(ADAM_MOMENTS)}, got {self.adam_moments!r}.")
        if self.shuffle_buffer_mb < 1 or self.shuffle_chunk_mb < 0:
            raise ValueError(f"shuffle_buffer_mb must be a positive number of MiB and shuffle_chunk_mb 0 (whole shards) "
                             f"or positive, got {self.shuffle_buffer_mb} and {self.shuffle_chunk_mb}.")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be 0 (only at the end) or positive, got {self.checkpoint_every}.")
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"device must be cpu, cuda or cuda:N, got {self.device!r}.")
        if self.matmul_dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"matmul_dtype must be auto, float32 or bfloat16, got {self.matmul_dtype!r}.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: TrainConfig fields whose default changed, and the value a saved run that does not name them had
LEGACY_TRAIN_DEFAULTS = {"lr_width": "total", "grad_clip": 0.0, "shuffle_chunk_mb": 0}


def default_lr(width: int) -> float:
    """Gao et al.'s scaling law, lr = 2e-4 / sqrt(M / 2^14), applied to the total width M."""
    return 2e-4 / math.sqrt(width / 2**14)


@dataclass(frozen=True)
class ParallelConfig:
    """How a run is split across processes (switchsae/distributed). Not saved with the run: a
    resume may use another split."""

    nproc: int = opt(1, "processes to start on this machine through torchrun (under torchrun, its world size counts)")
    expert_parallel: int = opt(1, "ranks a Switch SAE's experts are split across (divides the world size and the "
                                  "experts); the world size over it is the data-parallel size")
    expert_capacity: float = opt(0.0, "expert parallel: each rank sends at most expert_capacity * T / N of its T tokens "
                                      "to one expert, the rest are dropped and logged as 'dropped' (0: none dropped)")
    dist_timeout: float = opt(300.0, "seconds a rank waits for the others in one collective before the run stops "
                                     "with an error")

    def __post_init__(self) -> None:
        require_positive(self, "nproc", "expert_parallel")
        if not (self.expert_capacity >= 0 and math.isfinite(self.expert_capacity)):
            raise ValueError(f"expert_capacity must be 0 (no limit) or a positive number, got {self.expert_capacity}.")
        if not (self.dist_timeout > 0 and math.isfinite(self.dist_timeout)):
            raise ValueError(f"dist_timeout must be a positive number of seconds, got {self.dist_timeout}.")
