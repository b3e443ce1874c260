"""The ``switchsae`` command line: argument parsing and one library call per subcommand."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import MISSING, fields
from pathlib import Path

from switchsae.config import ARCHS, SAEConfig, TrainConfig

# Short flag names the issue tracker and the paper use, beside the field names.
FLAG_ALIASES = {"n_experts": "--experts", "l1_coeff": "--l1", "aux_coeff": "--alpha"}
# SAEConfig fields the train command fills in itself.
DERIVED_FIELDS = {"d_model", "act_scale"}


def _add_config_flags(parser: argparse.ArgumentParser, config_cls: type, skip: set[str] = frozenset()) -> None:
    """One ``--flag`` per dataclass field, help text from the field's metadata."""
    group = parser.add_argument_group(f"{config_cls.__name__} options")
    for f in fields(config_cls):
        if f.name in skip:
            continue
        names = [f"--{f.name.replace('_', '-')}"] + ([FLAG_ALIASES[f.name]] if f.name in FLAG_ALIASES else [])
        help_text = f.metadata.get("help", "")
        if f.type == "bool":
            group.add_argument(*names, dest=f.name, action="store_true", help=help_text)
            continue
        kind = {"int": int, "float": float, "float | None": float, "str": str}[f.type]
        required = f.default is MISSING
        default_text = "" if required or f.default is None else f" (default: {f.default})"
        group.add_argument(*names, dest=f.name, type=kind, required=required,
                           default=None if required else f.default, help=help_text + default_text,
                           choices=ARCHS if f.name == "arch" else None)


def _config_from_args(config_cls: type, args: argparse.Namespace, **extra):
    values = {f.name: getattr(args, f.name) for f in fields(config_cls) if hasattr(args, f.name)}
    return config_cls(**{**values, **extra})


def cmd_train(args: argparse.Namespace) -> None:
    from switchsae.sources.activations import open_activations
    from switchsae.train import train

    source = open_activations(args.acts)
    sae_cfg = _config_from_args(SAEConfig, args, d_model=source.d_model)
    train_cfg = _config_from_args(TrainConfig, args)
    train(sae_cfg, source, train_cfg, run_dir=args.out, resume=args.resume, force=args.force, progress=not args.quiet)
    print(f"saved {sae_cfg.arch} SAE to {args.out}")


def cmd_eval(args: argparse.Namespace) -> None:
    from switchsae.evaluate import evaluate
    from switchsae.saes.io import load_sae, write_json_atomic
    from switchsae.sources.activations import open_activations

    sae = load_sae(args.run)
    source = open_activations(args.acts)
    if source.d_model != sae.cfg.d_model:
        raise ValueError(f"activations have d_model={source.d_model} but the SAE expects {sae.cfg.d_model}")
    metrics = evaluate(sae, source.eval_batches(args.batch_size), progress=not args.quiet)
    write_json_atomic(Path(args.run) / "metrics.json", metrics)
    print(format_metrics(metrics))


def cmd_synth(args: argparse.Namespace) -> None:
    from safetensors.torch import save_file

    from switchsae.sources.synthetic import synthetic_activations

    acts = synthetic_activations(args.tokens, args.d_model, args.features, args.active, args.noise, args.seed)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_file({"activations": acts}, args.out)
    print(f"wrote {acts.shape[0]} x {acts.shape[1]} synthetic activations to {args.out}")


def format_metrics(metrics: dict) -> str:
    """Metrics as aligned ``name  value`` lines (lists, such as per-expert load, summarised)."""
    lines = []
    for name, value in metrics.items():
        if isinstance(value, list):
            value = "[" + ", ".join(f"{v:.3f}" for v in value[:8]) + (", ...]" if len(value) > 8 else "]")
        elif isinstance(value, float):
            value = f"{value:.6g}"
        lines.append(f"{name:<26}{value}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="switchsae", description="Switch Sparse Autoencoders on LM activations.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train an SAE on cached activations")
    p.add_argument("--acts", required=True, help="activations: .safetensors/.npy file or cache folder")
    p.add_argument("--out", required=True, help="run folder (checkpoint, cfg.json, weights, log)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--force", action="store_true", help="overwrite a run already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_config_flags(p, SAEConfig, skip=DERIVED_FIELDS)
    _add_config_flags(p, TrainConfig)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="metrics of a trained SAE on held-out activations")
    p.add_argument("run", help="run folder written by `switchsae train`")
    p.add_argument("--acts", required=True, help="activations: .safetensors/.npy file or cache folder")
    p.add_argument("--batch-size", type=int, default=4096, help="activations per batch (default: 4096)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("synth", help="write synthetic activations with a known sparse dictionary")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--tokens", type=int, default=100_000, help="rows (default: 100000)")
    p.add_argument("--d-model", type=int, default=576, help="activation width (default: 576)")
    p.add_argument("--features", type=int, default=4096, help="ground-truth dictionary size (default: 4096)")
    p.add_argument("--active", type=int, default=16, help="ground-truth features per row (default: 16)")
    p.add_argument("--noise", type=float, default=0.05, help="Gaussian noise scale (default: 0.05)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.set_defaults(func=cmd_synth)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as err:
        print(f"switchsae {args.command}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
