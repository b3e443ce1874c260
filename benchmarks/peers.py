"""Peer benchmark: each peer's own TopK SAE and ours, trained on the same batches in one run.

Installs nothing: every peer lives in its own virtual environment (``benchmarks/PEERS.md``
has the install commands). The harness writes the exact training batches (``steps × B``
rows, in order) and the held-out rows to two ``.npy`` files, runs one worker per peer in that
peer's Python (``benchmarks/peer_workers/NAME_worker.py``) and prints one Markdown table:
tokens/s of the timed training loop, peak RSS, and FVU, L0 and dead fraction on the held-out
rows, then the ratios of ours to the fastest peer.

    python benchmarks/peers.py --acts /tmp/syn.safetensors --steps 100
    python benchmarks/peers.py --acts ACTS --peers switchsae sparsify --python-for sparsify=/opt/sp/bin/python
    python benchmarks/peers.py --acts ACTS --peers saelens sparsify dictlearn switchsae switchsae-bf16
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from switchsae import host

HERE = Path(__file__).resolve().parent
WORKERS = HERE / "peer_workers"
RESULT_PREFIX = "PEER_RESULT "  # the same constant as peer_workers/common.py
PEERS = ("saelens", "sparsify", "dictlearn", "switchsae")
# Extra worker flags of our variants (each runs switchsae_worker.py in this Python); the Switch
# variants are FLOP-matched to the TopK of --width (N experts of --width latents, top-1 routing).
OUR_VARIANT_FLAGS = {"switchsae": [], "switchsae-bf16": ["--matmul-dtype", "bfloat16"],
                     "switchsae-sparse": ["--sparse-updates"], "switchsae-norm": ["--normalize"],
                     "switchsae-norm-bias": ["--normalize", "--encoder-bias"],
                     "switchsae-recipe": ["--normalize", "--lr-decay-frac", "0.2"],  # our TopK as `train` runs it
                     "switchsae-recipe-clip": ["--normalize", "--lr-decay-frac", "0.2", "--grad-clip", "1"],
                     "switchsae-switch4-recipe": ["--experts", "4", "--normalize", "--lr-decay-frac", "0.2"],
                     "switchsae-switch4-recipe-clip": ["--experts", "4", "--normalize", "--lr-decay-frac", "0.2",
                                                       "--grad-clip", "1"],
                     **{f"switchsae-switch{n}": ["--experts", str(n), "--normalize"] for n in (4, 8)}}
OURS = tuple(OUR_VARIANT_FLAGS)
TARGET_SPEEDUP = 1.5  # issue 4: ours >= 1.5x the fastest peer's tokens/s, FVU no worse after equal steps
COLUMNS = ("peer", "version", "tokens/s", "peak RSS GB", "FVU", "FVU other", "L0", "dead frac", "train s",
           "load 1-min")


def worker_command(name: str, python: str, files: dict[str, Path], args: argparse.Namespace) -> list[str]:
    """The command line that runs ``name``'s worker on the prepared batches."""
    script = WORKERS / f"{'switchsae' if name in OURS else name}_worker.py"
    command = [python, str(script), "--train", str(files["train"]), "--eval", str(files["eval"]),
               "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--width", str(args.width),
               "--k", str(args.k), "--lr", str(args.lr), "--warmup", str(args.warmup), "--seed", str(args.seed),
               "--threads", str(args.threads)]
    if "other" in files:
        command += ["--other", str(files["other"])]
    return command + OUR_VARIANT_FLAGS.get(name, [])


def python_for(name: str, overrides: dict[str, str]) -> Path:
    """The interpreter a peer runs in: an override, this Python for ours, else its venv."""
    if name in overrides:
        return Path(overrides[name])
    if name in OURS:
        return Path(sys.executable)
    return Path("/work/peers") / name / "bin" / "python"


def write_batches(acts: str, args: argparse.Namespace, out_dir: Path) -> dict[str, Path]:
    """Write the training batches in order, the held-out rows and, with ``--other-acts``, held-out rows of
    the other domain; return the paths (sets ``args.d_model``)."""
    from switchsae.sources.activations import open_activations

    source = open_activations(acts)
    args.d_model = source.d_model
    paths = {"train": out_dir / "train.npy", "eval": out_dir / "eval.npy"}
    train = np.lib.format.open_memmap(paths["train"], mode="w+", dtype=np.float32,
                                      shape=(args.steps * args.batch_size, source.d_model))
    stream = source.train_batches(args.batch_size, args.seed, 0)
    for i in range(args.steps):
        train[i * args.batch_size:(i + 1) * args.batch_size] = next(stream).float().numpy()
    train.flush()
    del train
    write_held_out(source, args, paths["eval"])
    if args.other_acts:
        other = open_activations(args.other_acts)
        if other.d_model != source.d_model:
            raise SystemExit(f"--other-acts has d_model {other.d_model}, --acts {source.d_model}")
        paths["other"] = out_dir / "other.npy"
        write_held_out(other, args, paths["other"])
    return paths


def write_held_out(source, args: argparse.Namespace, path: Path) -> None:
    """The first ``--eval-rows`` held-out rows of ``source`` as one ``.npy``."""
    held_out, count = [], 0
    for batch in source.eval_batches(args.batch_size):
        held_out.append(batch.float().numpy()[:args.eval_rows - count])
        count += held_out[-1].shape[0]
        if count >= args.eval_rows:
            break
    np.save(path, np.concatenate(held_out))


def run_worker(name: str, python: Path, command: list[str], timeout: float) -> dict:
    """Run one worker; its result dict, or a row saying why there is none."""
    if not python.exists():
        return {"peer": name, "error": f"no interpreter at {python} (see benchmarks/PEERS.md)"}
    env = {**os.environ, "TQDM_DISABLE": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"peer": name, "error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"peer": name, "error": f"exit {proc.returncode}: " + " | ".join(tail)}
    result = json.loads(lines[-1][len(RESULT_PREFIX):])
    result["peer"] = name
    result["wall_s"] = time.perf_counter() - started
    result["load_before"], result["load_after"] = load_before, os.getloadavg()[0]
    return result


def format_table(results: list[dict]) -> str:
    """One Markdown table, then each row's notes (what the peer does differently) below it."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    notes = []
    for r in results:
        if "error" in r:
            lines.append(f"| {r['peer']} |" + " — |" * (len(COLUMNS) - 1))
            notes.append(f"- {r['peer']}: FAILED: {r['error']}")
            continue
        cells = [r["peer"], r["version"], f"{r['tokens_per_s']:,.0f}", f"{r['peak_rss_gb']:.2f}",
                 f"{r['fvu']:.4f}", f"{r['fvu_other']:.4f}" if "fvu_other" in r else "—", f"{r['l0']:.1f}",
                 f"{r['dead_frac']:.4f}", f"{r['train_s']:.1f}",
                 f"{r['load_before']:.1f}→{r['load_after']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
        notes.append(f"- {r['peer']}: {r['notes']}")
    return "\n".join(lines + [""] + notes)


def summary(results: list[dict]) -> list[str]:
    """Ours against the fastest peer: tokens/s ratio and FVU difference."""
    done = [r for r in results if "error" not in r]
    peers = [r for r in done if r["peer"] not in OURS]
    if not peers:
        return ["no peer finished; nothing to compare against"]
    fastest = max(peers, key=lambda r: r["tokens_per_s"])
    best_fvu = min(peers, key=lambda r: r["fvu"])
    lines = []
    for ours in (r for r in done if r["peer"] in OURS):
        ratio = ours["tokens_per_s"] / fastest["tokens_per_s"]
        met = ratio >= TARGET_SPEEDUP and ours["fvu"] <= fastest["fvu"]
        lines.append(f"{ours['peer']}: {ratio:.2f}x the tokens/s of the fastest peer ({fastest['peer']}); "
                     f"FVU {ours['fvu']:.4f} vs {fastest['fvu']:.4f} (diff {ours['fvu'] - fastest['fvu']:+.4f}); "
                     f"vs best-FVU peer ({best_fvu['peer']}, {best_fvu['fvu']:.4f}): diff "
                     f"{ours['fvu'] - best_fvu['fvu']:+.4f}; target (>= {TARGET_SPEEDUP}x, FVU no worse): "
                     f"{'met' if met else 'NOT met'}")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--acts", help=".safetensors (tensor 'activations'), .npy or a cache folder")
    parser.add_argument("--steps", type=int, default=100, help="training steps (equal for every peer)")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--width", type=int, default=16384)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--lr", type=float, default=None, help="Adam lr for every peer; default 2e-4/sqrt(width/2^14)")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing")
    parser.add_argument("--eval-rows", type=int, default=16384, help="held-out rows for FVU, L0, dead fraction")
    parser.add_argument("--other-acts", default=None,
                        help="activations of another domain: FVU etc. also on its held-out rows ('FVU other')")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads in every worker (default: all cores)")
    parser.add_argument("--peers", nargs="+", default=list(PEERS), choices=list(PEERS) + list(OURS[1:]))
    parser.add_argument("--python-for", nargs="*", default=[], metavar="NAME=PYTHON",
                        help="interpreter of a peer (default /work/peers/NAME/bin/python; ours: this Python)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per worker")
    parser.add_argument("--workdir", default=None, help="where the batch files go (default: a temp dir, removed)")
    parser.add_argument("--json-out", default=None, help="also write all results to this JSON file")
    parser.add_argument("--table-from", default=None, help="only print the table of a --json-out file; run nothing")
    args = parser.parse_args(argv)
    if not args.acts and not args.table_from:
        parser.error("--acts is required (or --table-from to re-print a saved run)")
    if args.lr is None:
        args.lr = 2e-4 / math.sqrt(args.width / 2**14)
    if args.threads is None:
        args.threads = os.cpu_count() or 1
    return args


def print_report(settings: dict, results: list[dict]) -> None:
    """The settings line, the table and the comparison of ours with the peers."""
    print(f"\nSettings: d {settings['d_model']}, steps {settings['steps']} (timed {settings['steps'] - settings['warmup']}), "
          f"batch {settings['batch_size']}, width {settings['width']}, k {settings['k']}, "
          f"Adam lr {settings['lr']:g} betas (0.9, 0.999), {host.cpu_name()}, {settings['threads']} threads\n")
    print(format_table(results))
    print()
    print("\n".join(summary(results)))


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.table_from:
        saved = json.loads(Path(args.table_from).read_text())
        print_report(saved["settings"], saved["results"])
        return saved["results"]
    overrides = dict(item.split("=", 1) for item in args.python_for)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        files = write_batches(args.acts, args, Path(tmp))
        print(f"batches: {args.steps} x {args.batch_size} rows of d={args.d_model}, held-out "
              f"{np.load(files['eval'], mmap_mode='r').shape[0]} rows; width {args.width}, k {args.k}, "
              f"lr {args.lr:g}, threads {args.threads}", file=sys.stderr)
        results = []
        for name in args.peers:
            python = python_for(name, overrides)
            print(f"running {name} ({python}) ...", file=sys.stderr, flush=True)
            results.append(run_worker(name, python, worker_command(name, str(python), files, args), args.timeout))
            print(f"  {json.dumps(results[-1])}", file=sys.stderr, flush=True)
    print_report(vars(args), results)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"settings": vars(args), "results": results}, indent=1))
    return results


if __name__ == "__main__":
    main()
