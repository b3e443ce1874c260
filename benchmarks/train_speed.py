"""Training throughput of our SAEs on this machine, ratios measured in one run.

Prints, per configuration (each in a fresh process, so peak RSS is its own): tokens/s of a
full training step (forward, sparse backward, Adam with the decoder's projection), the time
split between those phases (of the median step: the machine is shared, and a neighbour's burst
should not move the table), encoder GFLOP/s against the machine's measured dense matmul peak and
memory bandwidth (the roofline), and pre-activation memory per token.

    python benchmarks/train_speed.py                    # the issue-4 table (d=576, k=32, T=4096)
    python benchmarks/train_speed.py --quick            # smaller, for a smoke run
    python benchmarks/train_speed.py --configs switch:524288:64:bf16+sparse
    python benchmarks/train_speed.py --configs topk:16384:1 switch:16384:16 --rounds 5   # the 8x ratio

A configuration is ``arch:width:experts[:options]``, options joined by ``+``: ``bf16`` (bfloat16
selection matmul), ``sparse`` (row-sparse gradients and lazy Adam, ``--sparse-updates``), a Switch
SAE's routing (``top2``: top-e with e = 2, ``shared``, ``expert_choice``, ``hash``, ``sinkhorn``;
``zloss0``: without the router z-loss, as before it was the default) and ``auxk`` (AuxK with a
quarter of the latents counted dead).

    python benchmarks/train_speed.py --configs switch:16384:16 switch:16384:16:top2 switch:16384:16:shared \
        switch:16384:16:expert_choice switch:16384:16:hash switch:16384:16:sinkhorn --rounds 3

``--adam-moments fp32 bf16`` times every configuration with each dtype of Adam's moments
(``--adam-moments``), alternating, and prints bf16's tokens/s against fp32's per configuration:

    python benchmarks/train_speed.py --configs topk:4096:1 switch:32768:8 --adam-moments fp32 bf16
"""
from __future__ import annotations

import argparse
import resource
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import torch

from switchsae import host
from switchsae.config import ADAM_MOMENTS, SAEConfig, TrainConfig
from switchsae.memory import reuse_freed_memory
from switchsae.saes import build_sae
from switchsae.train import optimizer_for, prepare_step

DEFAULT_CONFIGS = ["topk:16384:1", "topk:16384:1:bf16", "switch:16384:16", "switch:16384:16:sparse",
                   "switch:16384:16:bf16+sparse", "switch:524288:64", "switch:524288:64:bf16+sparse"]
#: routing options → RoutingConfig settings
ROUTING_OPTIONS = {"top2": {"router": "top_e", "experts_per_token": 2}, "shared": {"shared_expert": True},
                   "expert_choice": {"router": "expert_choice"}, "hash": {"router": "hash"},
                   "sinkhorn": {"router": "sinkhorn"}, "zloss0": {"z_loss_coeff": 0.0}}
OPTIONS = ("bf16", "sparse", "auxk", *ROUTING_OPTIONS)


def best_seconds(run: Callable[[], object], repeats: int = 3) -> float:
    """Fastest of ``repeats`` timed calls of ``run``, in seconds."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def median(items: list, key: Callable) -> object:
    """The middle item by ``key`` (the upper middle for an even count)."""
    return sorted(items, key=key)[len(items) // 2]


def matmul_peak(d: int, m: int, t: int, dtype: torch.dtype) -> float:
    """Measured GFLOP/s of one ``[t, d] × [d, m]`` matmul (best of 3)."""
    a, b = torch.randn(t, d, dtype=dtype), torch.randn(m, d, dtype=dtype)
    return 2 * t * d * m / best_seconds(lambda: torch.mm(a, b.t())) / 1e9


def copy_bandwidth(megabytes: int = 256) -> float:
    """Measured GB/s of copying a ``megabytes`` fp32 tensor (read + write, best of 3): the
    memory roof that Adam, the gradient writes and the sparse gathers run against."""
    a = torch.randn(megabytes * 2**20 // 4)
    b = torch.empty_like(a)
    return 2 * megabytes / 1024 / best_seconds(lambda: b.copy_(a))


def parse_config(spec: str) -> tuple[str, int, int, set[str]]:
    """``arch:width:experts[:opt+opt]`` → its parts; unknown options are an error."""
    arch, width, experts, *rest = spec.split(":")
    options = set(rest[0].split("+")) if rest else set()
    if options - set(OPTIONS):
        raise SystemExit(f"unknown option(s) {', '.join(sorted(options - set(OPTIONS)))} in {spec}; choose from {OPTIONS}")
    return arch, int(width), int(experts), options


def time_steps(spec: str, moments: str, args) -> dict:
    """One configuration's step times and peak RSS with Adam moments ``moments``, measured in a fresh process."""
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_time_steps_here, spec, moments, args, torch.get_num_threads()).result()


def _time_steps_here(spec: str, moments: str, args, threads: int) -> dict:
    torch.set_num_threads(threads)
    reuse_freed_memory()  # as switchsae.train does on CPU
    arch, width, experts, options = parse_config(spec)
    routing = {key: value for option in options & set(ROUTING_OPTIONS) for key, value in ROUTING_OPTIONS[option].items()}
    shared = int(routing.get("shared_expert", False))
    cfg = SAEConfig.from_flat(arch=arch, d_model=args.d_model, width=width // experts * (experts + shared), k=args.k,
                              n_experts=experts, auxk_coeff=1 / 32 if "auxk" in options else 0.0, **routing)
    sae = build_sae(cfg)
    sae.matmul_dtype = torch.bfloat16 if "bf16" in options else torch.float32
    sae.sparse_grads = "sparse" in options
    sae.tokens_since_fired = torch.zeros(cfg.width, dtype=torch.long)
    sae.tokens_since_fired[::4] = cfg.dead_tokens  # with auxk: a quarter of the latents dead
    train_cfg = TrainConfig(sparse_updates=sae.sparse_grads, adam_moments=moments)  # default clipping included
    opt = optimizer_for(sae, train_cfg)
    x = torch.randn(args.batch, args.d_model) * 4
    token_ids = torch.randint(0, 49152, (args.batch,))
    steps = []
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        out = sae(x, token_ids=token_ids)
        loss = sae.loss(x, out)["loss"]
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.perf_counter()
        prepare_step(opt, sae, train_cfg, lr=0.0)  # weights held still: every step times the same SAE
        opt.step()
        t3 = time.perf_counter()
        if step >= args.warmup:
            steps.append({"forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2})
    phases = median(steps, key=lambda phase: sum(phase.values()))
    total = sum(phases.values())
    encoder_flops = args.batch * sae.flops()["forward"] - 2 * args.batch * args.k * args.d_model
    return {
        "config": f"{arch} M={width} N={experts}" + "".join(f" {o}" for o in sorted(options))
                  + ("" if moments == "fp32" else f" {moments}-moments"),
        "tok/s": args.batch / total,
        **{f"{k} ms": v * 1e3 for k, v in phases.items()},
        "enc GFLOP/s": encoder_flops / phases["forward"] / 1e9,
        "preact KB/tok": 4 * cfg.expert_width * (sae.entries_per_token() if arch == "switch" else 1) / 1024,
        "RSS GB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="arch:width:experts[:bf16+sparse]")
    parser.add_argument("--d-model", type=int, default=576)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=7, help="timed steps per configuration (the median counts)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1,
                        help="time every configuration this many times, alternating; the table shows each one's median round")
    parser.add_argument("--adam-moments", nargs="+", default=["fp32"], choices=ADAM_MOMENTS,
                        help="dtypes of Adam's moments to time each configuration with (several: compared)")
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.configs, args.batch, args.steps, args.warmup = ["topk:4096:1", "switch:4096:16:bf16+sparse"], 1024, 2, 1
    peaks = {dtype: matmul_peak(args.d_model, 16384, args.batch, dtype) for dtype in (torch.float32, torch.bfloat16)}
    print(f"{host.cpu_name()}, threads={torch.get_num_threads()}  "
          f"dense matmul peak (d={args.d_model}, M=16384, T={args.batch}): "
          + ", ".join(f"{str(dtype).removeprefix('torch.')} {peak:.0f} GFLOP/s" for dtype, peak in peaks.items())
          + f"; memory copy {copy_bandwidth():.0f} GB/s")
    runs: dict[tuple[str, str], list[dict]] = {(spec, m): [] for spec in args.configs for m in args.adam_moments}
    for _ in range(args.rounds):  # rounds alternate the configurations, so a noisy minute hits them all
        for spec, moments in runs:
            runs[spec, moments].append(time_steps(spec, moments, args))
            print(" | ".join(f"{k} {v:.1f}" if isinstance(v, float) else str(v)
                             for k, v in runs[spec, moments][-1].items()), flush=True)
    rows = [median(results, key=lambda row: row["tok/s"]) for results in runs.values()]
    header = list(rows[0])
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(f"{row[h]:.1f}" if isinstance(row[h], float) else row[h] for h in header) + " |")
    if len(args.adam_moments) > 1:  # each configuration's other moments against its first
        per = len(args.adam_moments)
        for first, *others in (rows[i:i + per] for i in range(0, len(rows), per)):
            for row in others:
                print(f"{row['config']}: {row['tok/s'] / first['tok/s']:.2f}x the tokens/s of {first['config']}")
        return
    base = rows[0]["tok/s"]
    for row in rows[1:]:
        print(f"{row['config']}: {row['tok/s'] / base:.1f}x the tokens/s of {rows[0]['config']}")


if __name__ == "__main__":
    main()
