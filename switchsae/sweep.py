"""Sweeps as data: a TOML grid of SAE settings, validated whole, then trained run by run.

Format (paths relative to the working directory)::

    acts = "runs/cache"            # activation cache folder or .safetensors/.npy file
    out = "runs/sweep"             # runs go to out/<setting>/<run name>/
    loss_recovered = false         # also splice each SAE into the LM (needs a cache)
    eval_tokens = 32768            # tokens for loss recovered

    [train]                        # TrainConfig fields, shared by every run
    steps = 2000

    [[grid]]                       # one table per grid; list values are crossed
    name = "flop_matched"          # the setting: groups runs in tables and plots
    arch = ["topk", "switch"]
    expert_width = 4096            # width = n_experts * expert_width (FLOP-matched, SPEC §2)
    n_experts = [1, 2, 4, 8]
    k = [16, 32, 64, 128]

A grid may also set ``[train]`` fields (e.g. ``lr_width = ["total", "expert"]``, ``seed = [0, 1]``),
crossed like the rest; they override ``[train]`` for its runs and appear in the run names.

A grid gives either ``width`` (every SAE has M latents: fixed width) or ``expert_width``
(``M = N · M0``: FLOP-matched). Keys that do not apply to an architecture (``n_experts`` and
``aux_coeff`` outside Switch, ``k``, ``matmul_dtype`` and ``sparse_updates`` outside the TopK
family, ``l1_coeff`` outside the L1 family: each SAE class's ``specific_settings``) are dropped
for it, and runs that end up identical are kept once; ``switchsae train`` refuses them. Several grids may share a
name; their runs form one setting.

Every configuration is built before the first run starts, so an unknown key, a value of the
wrong type or an impossible combination (e.g. ``k`` above the expert width) fails at once,
naming its line. A run folder holding finished weights is skipped, one holding a checkpoint
is resumed; runs are evaluated once (``metrics.json``) and gathered into ``results.csv/.md``.

Several processes may work through the same sweep at once (e.g. one per core, each with
``OMP_NUM_THREADS=1``): each run folder is locked (``run.lock``, an ``flock`` the kernel
releases if its holder dies; :func:`switchsae.run_folder.run_lock`, which ``train`` takes too)
while a process trains and evaluates it, and the others skip it.
"""
from __future__ import annotations

import itertools
import json
import re
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from switchsae.analysis.runs import find_runs, write_results
from switchsae.checkpoint import CHECKPOINT_FILE, read_checkpoint_meta
from switchsae.config import ARCHS, FLAT_DEFAULTS, RoutingConfig, SAEConfig, TrainConfig
from switchsae.run_folder import run_lock
from switchsae.saes import SETTING_ARCHS, reads_setting
from switchsae.saes.io import read_cfg_dict, sae_files
from switchsae.toml_lines import key_line
from switchsae.train import TRAIN_CFG_FILE, settings_differ

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT_KEYS = {"acts": "str", "out": "str", "loss_recovered": "bool", "eval_tokens": "int", "train": "table",
             "grid": "array of tables"}
# SAEConfig fields a grid may set (the rest come from the activations), plus the grid's own keys.
GRID_FIELDS = {**{f.name: str(f.type) for f in fields(SAEConfig) if f.name not in ("d_model", "act_scale", "unit_scale", "hook_name",
                                                                                 "model_name", "routing")},
               **{f.name: str(f.type) for f in fields(RoutingConfig)}}
TRAIN_FIELDS = {f.name: str(f.type) for f in fields(TrainConfig)}
GRID_KEYS = {"name": "str", "expert_width": "int", **GRID_FIELDS, **TRAIN_FIELDS}
# How run names spell each setting; the first three always appear where they apply, the rest when not default.
NAME_LABELS = {"n_experts": "N", "k": "k", "l1_coeff": "lam", "router": "", "experts_per_token": "e",
               "shared_expert": "shared", "capacity_factor": "cap", "aux_coeff": "alpha", "z_loss_coeff": "z",
               "aux_units": "units_",
               "encoder_bias": "bias", "auxk_coeff": "auxk", "auxk_k": "kaux", "dead_tokens": "dead", "jump_threshold": "theta",
               "jump_bandwidth": "eps"}
ALWAYS_NAMED = ("n_experts", "k", "l1_coeff")
SETTING_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
# SAEConfig checks nothing about d_model but positivity; the real value is filled in from the activations.
ANY_D_MODEL = 1


class SweepConfigError(ValueError):
    """A sweep file that cannot run; the message names the file and line."""


@dataclass(frozen=True)
class RunSpec:
    """One run of a sweep: its setting, its canonical name, its SAE settings (without ``d_model``)
    and its training settings."""

    setting: str
    name: str
    params: dict[str, Any]
    train: TrainConfig

    def sae_config(self, d_model: int, model_name: str = "", hook_name: str = "") -> SAEConfig:
        return SAEConfig.from_flat(d_model=d_model, model_name=model_name, hook_name=hook_name, **self.params)

    def run_dir(self, out: Path) -> Path:
        return out / self.setting / self.name


@dataclass(frozen=True)
class Sweep:
    """A validated sweep file."""

    path: Path
    acts: Path
    out: Path
    runs: tuple[RunSpec, ...]
    loss_recovered: bool = False
    eval_tokens: int = 32_768


def _type_ok(value: Any, type_name: str) -> bool:
    """Whether a TOML value fits a dataclass field type (``int`` excludes booleans; ``float`` takes ints)."""
    if isinstance(value, bool):
        return type_name == "bool"
    if type_name == "array of tables":
        return isinstance(value, list) and all(isinstance(item, dict) for item in value)
    accepted: dict[str, type | tuple[type, ...]] = {"int": int, "float": (int, float), "float | None": (int, float),
                                                    "str": str, "bool": bool, "table": dict}
    return isinstance(value, accepted[type_name])


class _Locator:
    """Turns a problem into a :class:`SweepConfigError` naming the file and the line."""

    def __init__(self, path: Path, text: str):
        self.path, self.text = path, text

    def error(self, message: str, table: str = "", index: int = 0, key: str | None = None) -> SweepConfigError:
        line = key_line(self.text, table, index, key)
        return SweepConfigError(f"{self.path}, line {line}: {message}")

    def check_keys(self, data: dict, known: dict[str, str], where: str, table: str = "", index: int = 0,
                   lists: bool = False) -> None:
        """Every key known, every value of its field's type (with ``lists``, a value may be a list of them)."""
        for key, value in data.items():
            if key not in known:
                raise self.error(f"unknown key {key!r} in {where}; expected one of {', '.join(sorted(known))}.",
                                 table, index, key)
            values = value if isinstance(value, list) and lists else [value]
            if not values:
                raise self.error(f"{key} in {where} is an empty list; give at least one value.", table, index, key)
            bad = [v for v in values if not _type_ok(v, known[key])]
            if bad:
                raise self.error(f"{key} in {where} must be of type {known[key]}, got {bad[0]!r}.", table, index, key)


def run_name(params: dict[str, Any], train_overrides: dict[str, Any] | None = None) -> str:
    """Canonical folder name, e.g. ``switch-M16384-N16-k32`` or, with training settings a grid
    varies, ``switch-M16384-N16-k32-lr_width_expert-seed_1``: equal names mean equal settings."""
    arch, parts = params["arch"], [params["arch"], f"M{params['width']}"]
    for key, label in NAME_LABELS.items():
        if not reads_setting(arch, key):
            continue
        default = FLAT_DEFAULTS[key]
        value = params.get(key, default)
        if key in ALWAYS_NAMED or value != default:
            parts.append(f"{label}{value}" if isinstance(value, (str, bool)) else f"{label}{value:g}")
    parts += [f"{key}_{value}" for key, value in (train_overrides or {}).items()]
    return "-".join(parts)


def effective_params(combo: dict[str, Any]) -> dict[str, Any]:
    """The SAE settings of a combination: drop training keys and keys that do not apply to its
    architecture; resolve ``expert_width``."""
    arch = combo["arch"]
    params = {key: value for key, value in combo.items()
              if key != "name" and key not in TRAIN_FIELDS and reads_setting(arch, key)}
    if "expert_width" in params:
        params["width"] = params.pop("expert_width") * params.get("n_experts", 1)
    return params


def _check_grid(grid: dict, where: str, index: int, loc: _Locator) -> None:
    """The grid-level rules: a usable name, a known arch, one width rule, no key that applies to no arch."""
    name = grid.get("name")
    if not isinstance(name, str) or not SETTING_NAME.match(name):
        raise loc.error(f"{where} needs a name made of letters, digits, '.', '_' or '-' (it becomes a folder).",
                        "grid", index, "name")
    if "arch" not in grid:
        raise loc.error(f"{where} has no arch; give one of {', '.join(ARCHS)} or a list of them.", "grid", index)
    archs = grid["arch"] if isinstance(grid["arch"], list) else [grid["arch"]]
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        raise loc.error(f"{where} names unknown architecture {unknown[0]!r}; choose from {', '.join(ARCHS)}.",
                        "grid", index, "arch")
    if ("width" in grid) == ("expert_width" in grid):
        raise loc.error(f"{where} must give exactly one of width (fixed width) and expert_width "
                        "(width = n_experts * expert_width, FLOP-matched).", "grid", index)
    for key in grid:
        if key in SETTING_ARCHS and not set(archs) & set(SETTING_ARCHS[key]):
            raise loc.error(f"{key} in {where} applies to none of its architectures ({', '.join(archs)}); "
                            f"it only means something for {', '.join(SETTING_ARCHS[key])}.", "grid", index, key)


def _expand_grid(grid: dict, index: int, loc: _Locator, train: TrainConfig) -> list[RunSpec]:
    """The grid's cartesian product, each combination checked by building its configs."""
    where = f"[[grid]] #{index + 1}" + (f" ({grid['name']!r})" if isinstance(grid.get("name"), str) else "")
    loc.check_keys(grid, GRID_KEYS, where, "grid", index, lists=True)
    _check_grid(grid, where, index, loc)
    axes = {key: value if isinstance(value, list) else [value] for key, value in grid.items()}
    runs = []
    for values in itertools.product(*axes.values()):
        combo = dict(zip(axes, values))
        params = effective_params(combo)
        overrides = {key: value for key, value in combo.items()
                     if key in TRAIN_FIELDS and reads_setting(combo["arch"], key)}
        try:
            SAEConfig.from_flat(d_model=ANY_D_MODEL, **params)
            run_train = replace(train, **overrides)
        except ValueError as err:
            combination = ", ".join(f"{key}={value}" for key, value in {**params, **overrides}.items())
            raise loc.error(f"{where} contains an impossible combination ({combination}): {err}",
                            "grid", index) from None
        runs.append(RunSpec(grid["name"], run_name(params, overrides), params, run_train))
    return runs


def load_sweep(config_path: str | Path) -> Sweep:
    """Parse and validate a sweep file without training anything (``switchsae sweep --check``)."""
    path = Path(config_path)
    text = path.read_text()
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise SweepConfigError(f"{path} is not valid TOML: {err}.") from None
    loc = _Locator(path, text)
    loc.check_keys(data, ROOT_KEYS, "the top level")
    for key in ("acts", "out"):
        if key not in data:
            raise loc.error(f"the top level needs {key!r} (a path).")
    loc.check_keys(data.get("train", {}), TRAIN_FIELDS, "[train]", "train")
    try:
        train_cfg = TrainConfig(**data.get("train", {}))
    except ValueError as err:
        raise loc.error(f"[train] is invalid: {err}", "train") from None
    if not data.get("grid"):
        raise loc.error("the sweep has no [[grid]] table, so nothing to run.")
    runs: dict[tuple[str, str], RunSpec] = {}
    for index, grid in enumerate(data["grid"]):
        for spec in _expand_grid(grid, index, loc, train_cfg):
            runs.setdefault((spec.setting, spec.name), spec)
    eval_tokens = data.get("eval_tokens", Sweep.eval_tokens)
    if eval_tokens < 1:
        raise loc.error(f"eval_tokens must be a positive integer, got {eval_tokens}.", key="eval_tokens")
    return Sweep(path, Path(data["acts"]), Path(data["out"]), tuple(runs.values()),
                 data.get("loss_recovered", Sweep.loss_recovered), eval_tokens)


def check_existing_run(run_dir: Path, sae_cfg: SAEConfig, train_cfg: TrainConfig) -> str:
    """``"new"``, ``"resume"`` or ``"done"``; a run folder trained with other settings is an error."""
    if sae_files(run_dir)[1].exists():
        saved_sae = read_cfg_dict(run_dir)
        saved_train = json.loads((run_dir / TRAIN_CFG_FILE).read_text())
        state = "done"
    elif (run_dir / CHECKPOINT_FILE).exists():
        meta = read_checkpoint_meta(run_dir / CHECKPOINT_FILE)
        saved_sae, saved_train = json.loads(meta["sae_cfg"]), json.loads(meta["train_cfg"])
        state = "resume"
    else:
        return "new"
    differs = settings_differ(saved_sae, saved_train, sae_cfg, train_cfg)
    if differs:
        raise ValueError(f"{run_dir} holds a run with other settings ({', '.join(differs)}); "
                         "remove it or point the sweep's out at another folder.")
    return state


def run_sweep(config_path: str | Path, progress: bool = True) -> list[dict]:
    """Train and evaluate every run of the sweep (resuming), then write ``results.csv`` and ``results.md``.

    Returns one summary row per evaluated run under ``out`` (see
    :func:`switchsae.analysis.runs.run_summary`), so sweeps sharing ``out`` land in one table.
    """
    from switchsae.pipeline import evaluate_run
    from switchsae.sources.activations import open_activations
    from switchsae.train import train

    sweep = load_sweep(config_path)
    source = open_activations(sweep.acts)
    if sweep.loss_recovered and not hasattr(source, "manifest"):
        raise ValueError(f"{sweep.path} asks for loss_recovered, which needs an activation cache folder "
                         f"(naming the model, hook and corpus), but acts is the file {sweep.acts}.")
    origin = getattr(source, "manifest", {})
    configs = [spec.sae_config(source.d_model, origin.get("model", ""), origin.get("hook", "")) for spec in sweep.runs]
    for spec, cfg in zip(sweep.runs, configs):  # every folder checked before any training starts
        check_existing_run(spec.run_dir(sweep.out), cfg, spec.train)
    busy = []
    for spec, sae_cfg in zip(sweep.runs, configs):
        run_dir = spec.run_dir(sweep.out)
        with run_lock(run_dir) as mine:
            if not mine:
                busy.append(run_dir.name)
                continue
            state = check_existing_run(run_dir, sae_cfg, spec.train)  # again: another process may have finished it
            if state != "done":
                train(sae_cfg, source, spec.train, run_dir=run_dir, resume=state == "resume", progress=progress)
            if not (run_dir / "metrics.json").exists():
                evaluate_run(run_dir, source, loss_recovered=sweep.loss_recovered, eval_tokens=sweep.eval_tokens,
                             progress=progress)
    if busy:
        print(f"skipped {len(busy)} run(s) another process is working on: {', '.join(busy)}", file=sys.stderr)
    rows = find_runs(sweep.out)
    write_results(rows, sweep.out)
    return rows
