"""Step time and bytes moved per step of distributed training on this machine (gloo, CPU).

For each configuration and world size P, P worker processes (file rendezvous, ``threads / P``
threads each, so every P uses the same cores) train a Switch SAE on random activations for a
few steps, the way switchsae/train.py does (forward, loss, the guard's loss average, backward,
gradient averaging, the default clipping's global norm, LazyAdam, dead-latent counter). Collectives are counted as they are called:
the payload handed to each, and the bytes a rank actually sends to other ranks (ring all-reduce
``2(P−1)/P·n``, all-gather ``(P−1)·n``, all-to-all the rows bound for other ranks), per step.

    python benchmarks/distributed.py                          # the table of docs/distributed.md
    python benchmarks/distributed.py --configs 16384:16 --modes ddp ep --steps 5
    python benchmarks/distributed.py --configs 1048576:128 --dry    # memory and bytes the model predicts
    python benchmarks/distributed.py --configs 1048576:128 --d 64  # fits a 24 GB machine (d = 576: 19 GB a rank)
    python benchmarks/distributed.py --modes ep --router top_e --experts-per-token 2 --shared-expert

Modes: ``ddp`` (data parallel, dense gradients all-reduced), ``ddp-sparse`` (row-sparse
gradients gathered, ``--sparse-updates``), ``ep`` (experts split over all P ranks). Every row
also carries what :func:`model` predicts (memory per rank, all-to-all and all-reduce bytes), so
the written model of docs/distributed.md is checked against the measured bytes on every run.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from switchsae import host

MODES = ("ddp", "ddp-sparse", "ep")


def model(spec: dict, size: int, entries_out: float | None = None) -> dict:
    """What docs/distributed.md's model predicts for one rank and step: ``GB`` of training state
    (fp32 weights, two Adam moments and, dense, a gradient: 16 B a parameter; 12 B row-sparse;
    plus a few ``[T_r e, m]`` pre-activation buffers) and the bytes sent to other ranks.

    All-to-all (expert parallel, uniform routing): ``T_r · e · (P−1)/P`` entries leave their rank,
    each ``4(d+1) + 4d + 12k + 4`` bytes with one entry per token (row and gate out; x̂, code
    values and int64 ids back; the gate's gradient) or ``12d + 21k + 8`` with several (row and gate
    out; ``k`` candidates and ids back; a ``k``-byte winner mask out; ``z`` and the partial
    reconstruction back; their gradients and the gate's in the backward); plus the counts.
    With ``entries_out`` (measured) the all-to-all uses that count of entries leaving the rank
    instead of the uniform-routing one: a check of the bytes per entry alone.
    All-reduce: the replicated parameters' gradient (all of them for DDP; router, biases and the
    shared expert for EP), the firing mask of the dead-latent counter (``M`` bytes) and, for EP,
    the routed rows' squared gradient norm (one fp32 scalar, for clipping) in a ring, ``2(P−1)/P``
    of their bytes.
    """
    d, k, M, N, T = spec["d"], spec["k"], spec["width"], spec["experts"], spec["batch"]
    shared, e = spec.get("shared", False), spec.get("experts_per_token", 1)
    m = M // (N + int(shared))
    ep = spec["mode"] == "ep" and size > 1
    t_rank = T // size
    replicated = N * d + 2 * d + (2 * m * d if shared else 0)
    routed = 2 * N * m * d // (size if ep else 1)
    state = (12 if spec["mode"] == "ddp-sparse" else 16) * (routed + replicated)
    buffers = 3 * 4 * t_rank * (e + int(shared)) * m
    several = e > 1 or shared
    entry = 12 * d + 21 * k + 8 if several else 8 * d + 12 * k + 8
    leaving = t_rank * e * (size - 1) / size if entries_out is None else entries_out
    a2a = leaving * entry + (size - 1) * (N // size) * 8 if ep else 0.0
    ring = 2 * (size - 1) / size
    dense = replicated + (2 * N * m * d if spec["mode"] == "ddp" else 0)
    reduce = (4 * dense + M + (4 if ep else 0)) * ring  # firing mask: a byte a latent; EP: the norm's scalar
    return {"GB/rank": round((state + buffers) / 1e9, 2), "model a2a MB": round(a2a / 1e6, 3),
            "model all-reduce MB": round(reduce / 1e6, 3)}


def count_collectives(sent: dict[str, float]) -> None:
    """Wrap torch.distributed's collectives so that each adds to ``sent``: ``payload`` bytes and the
    bytes this rank sends to others (``wire``), by operation."""
    import torch.distributed as dist

    def size(t):
        return t.numel() * t.element_size()

    def wrap(name, wire):
        original = getattr(dist, name)

        def counted(*args, **kwargs):
            payload, on_wire = wire(*args, **kwargs)
            sent[f"{name}.payload"] = sent.get(f"{name}.payload", 0) + payload
            sent[f"{name}.wire"] = sent.get(f"{name}.wire", 0) + on_wire
            return original(*args, **kwargs)

        setattr(dist, name, counted)

    def group_size(kwargs):
        return dist.get_world_size(kwargs.get("group"))

    def all_to_all(out, inp, out_splits=None, in_splits=None, group=None, **_):
        rank, row = dist.get_rank(group), size(inp) // max(inp.shape[0], 1)
        return size(inp), (sum(in_splits) - in_splits[rank]) * row if inp.shape[0] else 0

    wrap("all_reduce", lambda t, **kw: (size(t), 2 * (group_size(kw) - 1) / group_size(kw) * size(t)))
    wrap("all_gather", lambda parts, t, **kw: (size(t), (group_size(kw) - 1) * size(t)))
    wrap("all_to_all_single", all_to_all)


def worker(rank: int, size: int, rendezvous: str, spec: dict, out: Path) -> None:
    """One rank: build, shard, run ``spec['steps']`` timed steps; rank 0 writes the result."""
    from switchsae.config import ParallelConfig, RoutingConfig, SAEConfig, TrainConfig
    from switchsae.distributed.launch import connect, disconnect
    from switchsae.saes import build_sae
    from switchsae.train import optimizer_for, prepare_step

    torch.set_num_threads(spec["threads"])
    mode = spec["mode"]
    world = connect(ParallelConfig(expert_parallel=size if mode == "ep" else 1, dist_timeout=600), "cpu",
                    init_method=rendezvous, rank=rank, world_size=size)
    routing = RoutingConfig(router=spec["router"], experts_per_token=spec["experts_per_token"],
                            shared_expert=spec["shared"])
    cfg = SAEConfig(arch="switch", d_model=spec["d"], width=spec["width"], k=spec["k"], n_experts=spec["experts"],
                    routing=routing)
    train_cfg = TrainConfig(batch_size=spec["batch"], sparse_updates=mode == "ddp-sparse", matmul_dtype="float32")
    sae = build_sae(cfg)
    sae.reset_parameters(torch.Generator().manual_seed(0))  # the same weights on every rank
    sae.sparse_grads = train_cfg.sparse_updates
    sae.tokens_since_fired = torch.zeros(cfg.width, dtype=torch.long)
    world.prepare(sae, broadcast=False)
    opt = optimizer_for(sae, train_cfg)
    local = spec["batch"] // size
    batches = torch.randn(spec["steps"] + spec["warmup"], local, spec["d"], generator=torch.Generator().manual_seed(rank))
    sent: dict[str, float] = {}
    count_collectives(sent)
    times = []
    for i, x in enumerate(batches):
        if i == spec["warmup"]:
            sent.clear()
        world.mesh.world.barrier()
        start = time.perf_counter()
        out_ = sae(x)
        losses = sae.loss(x, out_)
        world.mean(losses)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        world.reduce_gradients(sae)
        prepare_step(opt, sae, train_cfg, 1e-4, world)
        opt.step()
        sae.record_firing(out_.latents, local)
        world.mesh.world.barrier()
        times.append(time.perf_counter() - start)
        if "dispatched" in out_.extras and i >= spec["warmup"]:  # entries this rank sent to another rank
            route = out_.extras["dispatched"].route
            sent["entries_out"] = sent.get("entries_out", 0) + sum(route.send) - route.send[rank]
    measured = times[spec["warmup"]:]
    steps = len(measured)
    totals = world.total(torch.tensor([sent.get(k, 0.0) for k in sorted(sent)], dtype=torch.float64))
    peak = world.mesh.world.max(torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0],
                                             dtype=torch.float64)).item()  # Linux: KiB
    if rank == 0:
        per_step = {key: value / steps / size for key, value in zip(sorted(sent), totals.tolist())}
        out.write_text(json.dumps({**spec, "world": size, "step_s": sorted(measured)[steps // 2], "bytes": per_step,
                                   "peak_rss": peak}))
    disconnect()


def run(spec: dict, size: int) -> dict:
    """Run ``spec`` on ``size`` processes; the result rank 0 wrote (bytes averaged over ranks)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        spec = {**spec, "threads": max(1, spec["threads"] // size)}
        env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]),
               "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
        procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(rank), str(size), f"file://{tmp}/rdv",
                                   json.dumps(spec), str(out)], env=env) for rank in range(size)]
        if any(p.wait() for p in procs):
            raise RuntimeError(f"a worker failed for {spec}")
        return json.loads(out.read_text())


def describe(spec: dict, size: int) -> dict:
    """The row's first columns: the configuration and the layout."""
    routing = spec["router"] + (f"-{spec['experts_per_token']}" if spec["router"] == "top_e" else "") + (
        "+shared" if spec["shared"] else "")
    mode = spec["mode"] if size > 1 else "one process"
    return {"config": f"M={spec['width']:,} N={spec['experts']} d={spec['d']}", "routing": routing, "mode": mode,
            "P": size}


def summary(result: dict) -> dict:
    """The table row: step time, bytes per rank and step by kind (MB), and the model's prediction."""
    b = result["bytes"]
    mb = 1e6
    return {**describe(result, result["world"]), "step_ms": round(result["step_s"] * 1e3, 1),
            "all-to-all MB": round(b.get("all_to_all_single.wire", 0) / mb, 3),
            "all-reduce MB": round(b.get("all_reduce.wire", 0) / mb, 3),
            "all-gather MB": round(b.get("all_gather.wire", 0) / mb, 3),
            "payload MB": round(sum(v for k, v in b.items() if k.endswith(".payload")) / mb, 3),
            "peak RSS GB": round(result["peak_rss"] / 1e9, 2) if "peak_rss" in result else None,
            **model(result, result["world"]),
            "model a2a MB, measured entries": model(result, result["world"], b.get("entries_out"))["model a2a MB"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["16384:16", "65536:64"], help="width:experts")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--worlds", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--d", type=int, default=576)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096, help="tokens per step, all ranks together")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads shared by the P ranks")
    parser.add_argument("--router", default="top1", choices=("top1", "top_e", "expert_choice", "sinkhorn"))
    parser.add_argument("--experts-per-token", type=int, default=1)
    parser.add_argument("--shared-expert", action="store_true")
    parser.add_argument("--dry", action="store_true", help="print the model's memory and bytes, run nothing")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    rows = []
    for config in args.configs:
        width, experts = map(int, config.split(":"))
        for size in args.worlds:
            for mode in args.modes if size > 1 else ["ddp"]:  # one process: every mode is the same run
                spec = dict(width=width, experts=experts, d=args.d, k=args.k, batch=args.batch, steps=args.steps,
                            warmup=args.warmup, threads=args.threads, mode=mode, router=args.router,
                            experts_per_token=args.experts_per_token, shared=args.shared_expert)
                rows.append({**describe(spec, size), **model(spec, size)} if args.dry else summary(run(spec, size)))
                print(json.dumps(rows[-1]), flush=True)
    columns = list(rows[0])
    print(f"\n{host.cpu_name()}, {args.threads} threads shared by the ranks")
    print("\n| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in columns) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], json.loads(sys.argv[5]), Path(sys.argv[6]))
    else:
        main()
