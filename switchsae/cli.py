"""The ``switchsae`` command line: argument parsing and one library call per subcommand."""
from __future__ import annotations

import argparse
import sys
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Container

from switchsae.apps.autointerp.config import AutointerpConfig, EndpointConfig
from switchsae.apps.config import InspectConfig
from switchsae.apps.steer import SteerConfig
from switchsae.config import ARCHS, ROUTERS, ParallelConfig, RoutingConfig, SAEConfig, TrainConfig
from switchsae.pipeline import DemoConfig
from switchsae.sources.hooks import SITES

# Short flag names the issue tracker and the paper use, beside the field names.
FLAG_ALIASES = {"n_experts": "--experts", "l1_coeff": "--l1", "aux_coeff": "--alpha"}
# SAEConfig fields the train command fills in itself (routing gets flags of its own fields).
DERIVED_FIELDS = {"d_model", "act_scale", "unit_scale", "routing"}
# Formats `switchsae export` / `switchsae import` convert to and from (switchsae/apps/).
INTEROP_FORMATS = ("saelens",)
#: what `switchsae export` writes: an SAE (saelens) or, from feature pages, Neuronpedia batch files
EXPORT_FORMATS = ("saelens", "neuronpedia")


def _add_config_flags(parser: argparse.ArgumentParser, config_cls: type, skip: Container[str] = frozenset()) -> None:
    """One ``--flag`` per dataclass field, help text from the field's metadata. A flag not given
    leaves no attribute (``argparse.SUPPRESS``), so the dataclass default applies and the flags a
    user did give can be told apart."""
    group = parser.add_argument_group(f"{config_cls.__name__} options")
    for f in fields(config_cls):
        if f.name in skip:
            continue
        names = [f"--{f.name.replace('_', '-')}"] + ([FLAG_ALIASES[f.name]] if f.name in FLAG_ALIASES else [])
        help_text = f.metadata.get("help", "")
        if f.type == "bool":
            group.add_argument(*names, dest=f.name, action="store_true", default=argparse.SUPPRESS, help=help_text)
            continue
        kind = {"int": int, "int | None": int, "float": float, "float | None": float, "str": str}[str(f.type)]
        required = f.default is MISSING
        default_text = "" if required or f.default is None else f" (default: {f.default})"
        group.add_argument(*names, dest=f.name, type=kind, required=required,
                           default=None if required else argparse.SUPPRESS, help=help_text + default_text,
                           choices={"arch": ARCHS, "router": ROUTERS}.get(f.name))


def positive_int(text: str) -> int:
    """argparse type of counts and sizes: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _config_from_args(config_cls: type, args: argparse.Namespace, **extra):
    values = {f.name: getattr(args, f.name) for f in fields(config_cls) if hasattr(args, f.name)}
    return config_cls(**{**values, **extra})


def _flag(name: str) -> str:
    """How the help spells the flag of config field ``name``."""
    return FLAG_ALIASES.get(name, f"--{name.replace('_', '-')}")


def _refuse_inapplicable_flags(args: argparse.Namespace) -> None:
    """Flags given for an architecture that never reads them are an error (sweep files drop such
    keys per architecture; one run names one architecture, so here they can only be a mistake)."""
    from switchsae.saes import SETTING_ARCHS, reads_setting

    wrong = [name for name in SETTING_ARCHS if hasattr(args, name) and not reads_setting(args.arch, name)]
    if wrong:
        raise ValueError("; ".join(f"{_flag(name)} does not apply to --arch {args.arch} "
                                   f"(only to {', '.join(SETTING_ARCHS[name])})" for name in wrong))


def cmd_train(args: argparse.Namespace) -> None:
    from switchsae.distributed import launch
    from switchsae.sources.activations import open_activations
    from switchsae.train import train

    _refuse_inapplicable_flags(args)
    parallel = _config_from_args(ParallelConfig, args)
    if parallel.nproc > 1 and not launch.launched_by_torchrun():
        raise SystemExit(launch.relaunch(parallel.nproc, launch.without_nproc(args.argv)))
    train_cfg = _config_from_args(TrainConfig, args)
    source = open_activations(args.acts)
    origin = getattr(source, "manifest", {})  # an activation cache names its model and hook
    routing = _config_from_args(RoutingConfig, args)
    sae_cfg = _config_from_args(SAEConfig, args, d_model=source.d_model, routing=routing,
                                model_name=getattr(args, "model_name", "") or origin.get("model", ""),
                                hook_name=getattr(args, "hook_name", "") or origin.get("hook", ""))
    world = launch.world_for(parallel, train_cfg.device)
    try:
        train(sae_cfg, source, train_cfg, run_dir=args.out, resume=args.resume, force=args.force,
              progress=not args.quiet, world=world)
    finally:
        launch.disconnect()
    if world.writes:
        print(f"saved {sae_cfg.arch} SAE to {args.out}")


def cmd_eval(args: argparse.Namespace) -> None:
    from switchsae.pipeline import evaluate_run

    metrics = evaluate_run(args.run, args.acts, loss_recovered=args.loss_recovered, eval_tokens=args.eval_tokens,
                           model=args.model, batch_size=args.batch_size, progress=not args.quiet)
    print(format_metrics(metrics))


def cmd_cache(args: argparse.Namespace) -> None:
    from switchsae.sources.cache import build_cache, check, describe
    from switchsae.sources.hooks import HookPoint

    if args.check:
        print(f"{args.check}: every checksum matches, no NaN or inf ({describe(check(args.check))})")
        return
    missing = [flag for flag, value in (("--layer", args.layer), ("--tokens", args.tokens), ("--out", args.out))
               if value is None]
    if missing:
        raise ValueError(f"building a cache needs {', '.join(missing)} (or give --check CACHE to verify one)")
    out = build_cache(args.model, HookPoint(args.layer, args.site), args.corpus, args.tokens, args.out,
                      context_length=args.context_length, batch_size=args.batch_size, dtype=args.dtype,
                      drop_first=args.drop_first, model_dtype=args.model_dtype, text_field=args.text_field,
                      progress=not args.quiet)
    print(f"activation cache ready in {out}")


def cmd_demo(args: argparse.Namespace) -> None:
    from switchsae.pipeline import DemoConfig, run_demo

    run_demo(DemoConfig(out=Path(args.out), tokens=args.tokens, steps=args.steps, other_corpus=args.other_corpus),
             progress=not args.quiet)


def cmd_inspect(args: argparse.Namespace) -> None:
    from switchsae.apps.inspect import inspect_run, parse_features
    from switchsae.apps.pages import how_to_open

    features = parse_features(args.features) if args.features else None
    out = inspect_run(args.run, args.acts, args.out, _config_from_args(InspectConfig, args), features=features,
                      expert=args.expert, progress=not args.quiet)
    print(f"wrote feature pages to {out}: {how_to_open(out)}")


def cmd_autointerp(args: argparse.Namespace) -> None:
    from switchsae.apps.autointerp.run import format_summary, run_autointerp

    out = args.out or str(Path(args.run) / "autointerp")
    summary = run_autointerp(args.run, args.acts, _config_from_args(AutointerpConfig, args),
                             _config_from_args(EndpointConfig, args), out=out, inspect_dir=args.inspect,
                             progress=not args.quiet)
    print(format_summary(summary, out))


def cmd_serve(args: argparse.Namespace) -> None:
    from switchsae.apps.serve import HOST, make_server

    server = make_server(args.dir, args.port)
    print(f"serving {args.dir} at http://{HOST}:{server.server_address[1]}/ (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def cmd_synth(args: argparse.Namespace) -> None:
    from switchsae.saes.io import save_tensors_atomic
    from switchsae.sources.synthetic import synthetic_activations

    acts = synthetic_activations(args.tokens, args.d_model, args.features, args.active, args.noise, args.seed)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_tensors_atomic({"activations": acts}, Path(args.out))
    print(f"wrote {acts.shape[0]} x {acts.shape[1]} synthetic activations to {args.out}")


def cmd_sweep(args: argparse.Namespace) -> None:
    from switchsae.analysis.runs import result_columns
    from switchsae.analysis.tables import markdown_table
    from switchsae.sweep import load_sweep, run_sweep

    if args.check:
        sweep = load_sweep(args.config)
        print("\n".join(str(spec.run_dir(sweep.out)) for spec in sweep.runs))
        print(f"{args.config} is valid: {len(sweep.runs)} runs")
        return
    rows = run_sweep(args.config, progress=not args.quiet)
    print(markdown_table(rows, result_columns(rows)))


def cmd_report(args: argparse.Namespace) -> None:
    from switchsae.report import write_report

    print(f"wrote {write_report(args.dir)}")


def cmd_export(args: argparse.Namespace) -> None:
    if args.format == "neuronpedia":
        from switchsae.apps.neuronpedia import export_neuronpedia

        if args.acts is not None:
            raise ValueError("--acts applies to --format saelens; Neuronpedia files come from the feature pages.")
        out = export_neuronpedia(args.run, args.out, sae_set=args.sae_set, model_id=args.model_id, layer=args.layer,
                                 force=args.force)
        print(f"wrote Neuronpedia batch files to {out}")
        return
    from switchsae.apps.saelens import export_saelens

    out = export_saelens(args.run, args.out, acts=args.acts, batch_size=args.batch_size, force=args.force)
    print(f"wrote {args.format} SAE folder {out}")


def cmd_import(args: argparse.Namespace) -> None:
    from switchsae.apps.saelens import import_saelens

    print(f"wrote run folder {import_saelens(args.folder, args.out, force=args.force)}")


def cmd_steer(args: argparse.Namespace) -> None:
    from switchsae.apps.steer import steer

    print(steer(args.run, args.prompt, _config_from_args(SteerConfig, args), model=args.model).format())


def cmd_probe(args: argparse.Namespace) -> None:
    from switchsae.evals.probing import ProbingConfig, format_probing, run_probing

    result = run_probing(args.runs, _config_from_args(ProbingConfig, args), model=args.model, progress=not args.quiet,
                         out=args.out)
    print(format_probing(result) + (f"\nwrote {args.out}" if args.out else ""))


def cmd_absorption(args: argparse.Namespace) -> None:
    from switchsae.evals.absorption import AbsorptionConfig, format_absorption, run_absorption

    result = run_absorption(args.runs, _config_from_args(AbsorptionConfig, args), model=args.model,
                            progress=not args.quiet, out=args.out)
    print(format_absorption(result) + (f"\nwrote {args.out}" if args.out else ""))


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
    p.add_argument("--out", required=True, help="run folder (checkpoint, SAE config, weights, log)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--force", action="store_true", help="overwrite a run already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_config_flags(p, SAEConfig, skip=DERIVED_FIELDS)
    _add_config_flags(p, RoutingConfig)
    _add_config_flags(p, TrainConfig)
    _add_config_flags(p, ParallelConfig)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="metrics of a trained SAE on held-out activations")
    p.add_argument("run", help="run folder written by `switchsae train`")
    p.add_argument("--acts", required=True, help="activations: .safetensors/.npy file or cache folder")
    p.add_argument("--batch-size", type=positive_int, default=4096, help="activations per batch (default: 4096)")
    p.add_argument("--loss-recovered", action="store_true",
                   help="also splice the SAE into the LM: ce_clean, ce_sae, ce_zero, loss_recovered, KL (needs a cache)")
    p.add_argument("--model", default=None,
                   help="LM for --loss-recovered (default: the one named in the SAE config / the cache); must match the cache")
    p.add_argument("--eval-tokens", type=positive_int, default=32_768, help="tokens for --loss-recovered (default: 32768)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("cache", help="run an LM over a corpus and cache activations at a hook point, or verify a cache")
    p.add_argument("--check", metavar="CACHE", default=None,
                   help="only verify the cache in CACHE: every file against its sha256, every row finite; build nothing")
    p.add_argument("--model", default="smollm2-135m",
                   help="HF id, local folder, or embedded short name: smollm2-135m, gemma3-270m (default: smollm2-135m)")
    p.add_argument("--layer", type=int, default=None, help="decoder layer index (0-based; required to build)")
    p.add_argument("--site", default="resid_post", choices=SITES, help="where in the layer (default: resid_post)")
    p.add_argument("--corpus", default="wiki-vital",
                   help="text file/folder, .jsonl, .parquet, hf:NAME, or wiki-vital (default: wiki-vital)")
    p.add_argument("--text-field", default="text", help="field holding the text in jsonl/parquet/HF rows (default: text)")
    p.add_argument("--tokens", type=positive_int, default=None, help="activation rows to cache (required to build)")
    p.add_argument("--out", default=None, help="cache folder (an interrupted build resumes; required to build)")
    p.add_argument("--context-length", type=positive_int, default=128, help="tokens per window, BOS included (default: 128)")
    p.add_argument("--drop-first", type=int, default=1,
                   help="leave out the first positions of each window, the attention sink (default: 1)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="storage dtype (default: bf16)")
    p.add_argument("--model-dtype", default="fp32", choices=["bf16", "fp16", "fp32"],
                   help="dtype the LM runs in (default: fp32)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="windows per forward pass (default: 16)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("demo", help="the whole path on the embedded SmolLM2 and Wikipedia text")
    p.add_argument("--out", default="runs/demo", help="output folder; every stage resumes (default: runs/demo)")
    p.add_argument("--tokens", type=positive_int, default=DemoConfig.tokens, help=f"tokens to cache (default: {DemoConfig.tokens})")
    p.add_argument("--steps", type=positive_int, default=DemoConfig.steps, help=f"training steps per SAE (default: {DemoConfig.steps})")
    p.add_argument("--other-corpus", help="text of another domain (file/folder, .jsonl, .parquet, hf:NAME): "
                                          f"{DemoConfig.other_tokens:,} of its tokens cached, both SAEs scored "
                                          "on them too (default: in domain only)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("inspect", help="feature pages of a trained SAE: one pass over a cache with token ids")
    p.add_argument("run", help="run folder written by `switchsae train`")
    p.add_argument("--acts", required=True, help="activation cache folder (with token ids) of the SAE's model and hook")
    p.add_argument("--out", required=True, help="folder for the feature pages (replaced if it holds earlier pages)")
    p.add_argument("--features", default=None, help="latent ids and ranges to inspect, e.g. 0-99,512 (default: all)")
    p.add_argument("--expert", type=int, default=None, help="inspect only this expert's latents (Switch SAEs)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_config_flags(p, InspectConfig)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("autointerp", help="explain sampled latents with an LLM and score the explanations "
                                          "(detection, fuzzing); resumable")
    p.add_argument("run", help="run folder written by `switchsae train`")
    p.add_argument("--acts", required=True, help="activation cache folder (with token ids) of the SAE's model and hook")
    p.add_argument("--out", default=None, help="folder for prompts, replies and scores; a rerun resumes it "
                                               "(default: RUN/autointerp)")
    p.add_argument("--inspect", default=None, help="feature pages of this run and cache (`switchsae inspect`) to take "
                                                   "the examples from, instead of a pass over the cache")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_config_flags(p, AutointerpConfig)
    _add_config_flags(p, EndpointConfig)
    p.set_defaults(func=cmd_autointerp)

    p = sub.add_parser("serve", help="serve feature pages on 127.0.0.1 (they also open from file://)")
    p.add_argument("dir", help="folder written by `switchsae inspect`")
    p.add_argument("--port", type=int, default=8000, help="port, 0 for any free one (default: 8000)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("synth", help="write synthetic activations with a known sparse dictionary")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--tokens", type=positive_int, default=100_000, help="rows (default: 100000)")
    p.add_argument("--d-model", type=positive_int, default=576, help="activation width (default: 576)")
    p.add_argument("--features", type=positive_int, default=4096, help="ground-truth dictionary size (default: 4096)")
    p.add_argument("--active", type=positive_int, default=16, help="ground-truth features per row (default: 16)")
    p.add_argument("--noise", type=float, default=0.05, help="Gaussian noise scale (default: 0.05)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("sweep", help="train and evaluate a grid of SAEs from a TOML sweep file (resumable)")
    p.add_argument("config", help="sweep file, e.g. configs/paper_flop_matched.toml (format: switchsae.sweep)")
    p.add_argument("--check", action="store_true", help="only validate the file and list its runs; train nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("export", help="write a trained SAE in another library's format (SAELens), or its "
                                      "feature pages as Neuronpedia/SAEDashboard JSON")
    p.add_argument("run", help="run folder written by `switchsae train` or `switchsae import` (saelens), or "
                               "feature pages written by `switchsae inspect` (neuronpedia)")
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="target format")
    p.add_argument("--out", required=True, help="folder to write (saelens: cfg.json, sae_weights.safetensors; "
                                                "neuronpedia: batch-N.json, skipped_indexes.json)")
    p.add_argument("--acts", default=None,
                   help="activations to measure each latent's firing density on (held-out rows) for sparsity.safetensors; "
                        "without it no sparsity file is written")
    p.add_argument("--batch-size", type=int, default=4096, help="activations per batch with --acts (default: 4096)")
    p.add_argument("--sae-set", default=None, help="neuronpedia: the SAE set's name (default: switchsae-ARCH-WIDTH)")
    p.add_argument("--model-id", default=None, help="neuronpedia: the model's id (default: the cache's model)")
    p.add_argument("--layer", type=int, default=None, help="neuronpedia: the layer (default: read from the hook name)")
    p.add_argument("--force", action="store_true", help="overwrite an export already in --out")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="convert another library's SAE folder (SAELens) into a run folder")
    p.add_argument("folder", help="SAELens SAE folder (cfg.json, sae_weights.safetensors)")
    p.add_argument("--format", default="saelens", choices=INTEROP_FORMATS, help="source format (default: saelens)")
    p.add_argument("--out", required=True, help="run folder to write (then eval, steer, inspect it)")
    p.add_argument("--force", action="store_true", help="overwrite a run already in --out")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("steer", help="generate with a feature's decoder direction (and/or a forced expert) added "
                                     "at the SAE's hook, its error term kept; print both continuations")
    p.add_argument("run", help="run folder written by `switchsae train` (its config names the model and hook)")
    p.add_argument("--prompt", required=True, help="text to continue (BOS is prepended as in the cache)")
    p.add_argument("--model", default=None, help="LM to steer (default: the one named in the SAE config)")
    p.add_argument("--quiet", action="store_true", help="no progress bar while the model loads")
    _add_config_flags(p, SteerConfig)
    p.set_defaults(func=cmd_steer)

    from switchsae.evals.absorption import AbsorptionConfig
    from switchsae.evals.probing import ProbingConfig

    for name, config_cls, func, text in (
            ("probe", ProbingConfig, cmd_probe, "sparse probing (SAEBench): top-m latents by class mean difference, "
                                               "logistic probes on labelled documents, balanced accuracy"),
            ("absorption", AbsorptionConfig, cmd_absorption, "first-letter feature absorption (SAEBench): "
                                                             "probes on the vocabulary, main and absorbing latents")):
        p = sub.add_parser(name, help=text)
        p.add_argument("runs", nargs="+", help="run folders of SAEs on one model and hook (one model pass for all)")
        p.add_argument("--model", default=None, help="LM to run (default: the one named in the SAE configs)")
        p.add_argument("--out", default=None, help="JSON file of every score per class/letter and seed (rewritten after each SAE)")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        _add_config_flags(p, config_cls, skip={"ms"})  # SAEBench's m = 1, 2, 5, 10, 20
        p.set_defaults(func=func)

    p = sub.add_parser("report", help="plots and report.md for a sweep's output folder")
    p.add_argument("dir", help="the sweep's out folder (holding <setting>/<run>/metrics.json)")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)  # what --nproc hands to each rank
    if getattr(args, "quiet", False):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the model loader's own "Loading weights" bar
    try:
        args.func(args)
    except KeyboardInterrupt as err:  # a training run's says what it leaves behind
        _close_progress_bars()
        print(f"switchsae {args.command}: interrupted" + (f"; {err}" if str(err) else ""), file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as err:
        if not expected_failure(err):
            raise
        _close_progress_bars()
        if not getattr(err, "reported_elsewhere", False):  # another rank of a distributed run prints it
            print(f"switchsae {args.command}: error: {one_line(err)}", file=sys.stderr)
        raise SystemExit(2) from None


def _close_progress_bars() -> None:
    """End the bars a failed command left open, so its message starts on a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):  # the set tqdm.write uses for the same purpose
        bar.close()


def expected_failure(err: Exception) -> bool:
    """Whether ``err`` is a problem with the input or the machine (reported in one line) rather
    than a bug (which keeps its traceback): bad values, files and folders (missing, corrupt,
    unwritable, read-only, full), a missing optional package, no memory, a diverged run."""
    if isinstance(err, ImportError):
        return not (err.name or "").startswith("switchsae")  # our own broken import is a bug
    import torch
    from safetensors import SafetensorError

    from switchsae.distributed.group import DistributedError
    from switchsae.train import TrainingDiverged

    expected = (ValueError, OSError, MemoryError, torch.OutOfMemoryError, SafetensorError, TrainingDiverged,
                DistributedError)
    return isinstance(err, expected)


def one_line(err: Exception) -> str:
    """The message of an expected failure on one line; an OS error as ``path: reason``, a missing
    package with how to install it."""
    text = str(err) or type(err).__name__
    if isinstance(err, OSError) and err.strerror and err.filename:
        text = f"{err.filename}: {err.strerror}"
    elif isinstance(err, ImportError) and err.name and "pip install" not in text:
        text = f"{text} (an optional package: pip install {err.name.partition('.')[0]})"
    return " ".join(text.split())


if __name__ == "__main__":
    main()
