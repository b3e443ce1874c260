"""Quality cost of the speed options: bf16 selection and row-sparse (lazy) Adam vs the fp32 default.

Trains the same SAE on the same batches once per variant and prints held-out FVU, L0, dead
fraction and wall-clock tokens/s (including initialisation), so the options' quality differences are measured, not assumed.

    python benchmarks/variants_quality.py --acts runs/demo/cache --arch switch --width 16384 --experts 16
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from switchsae import host
from switchsae.analysis.tables import markdown_table
from switchsae.config import SAEConfig, TrainConfig
from switchsae.evaluate import evaluate
from switchsae.sources.activations import open_activations
from switchsae.train import train

VARIANTS = {
    "fp32, dense Adam": {"matmul_dtype": "float32"},
    "bf16 selection": {"matmul_dtype": "bfloat16"},
    "sparse updates (lazy Adam)": {"matmul_dtype": "float32", "sparse_updates": True},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--acts", required=True)
    parser.add_argument("--arch", default="switch")
    parser.add_argument("--width", type=int, default=16384)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=4096)
    args = parser.parse_args()
    source = open_activations(args.acts)
    sae_cfg = SAEConfig(arch=args.arch, d_model=source.d_model, width=args.width, k=args.k,
                        n_experts=args.experts if args.arch == "switch" else 1)
    rows = []
    for name, options in VARIANTS.items():
        cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, normalize=True, checkpoint_every=0,
                          log_every=args.steps, **options)
        start = time.perf_counter()
        sae = train(sae_cfg, source, cfg, progress=False)
        tokens_per_s = args.steps * args.batch_size / (time.perf_counter() - start)
        metrics = evaluate(sae, source.eval_batches(4096), progress=False)
        rows.append({"variant": name, **metrics, "tokens/s": tokens_per_s})
        print(json.dumps(rows[-1]), flush=True)
    print(f"{host.cpu_name()}, {torch.get_num_threads()} threads")
    print(markdown_table(rows, ["variant", "fvu", "mse", "l0", "dead_frac", "tokens/s"]))


if __name__ == "__main__":
    main()
