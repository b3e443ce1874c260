"""Recipe and routing studies on real activations, scored in and out of domain, over seeds.

Each study is a list of variants (SAE settings + training settings, as flat dicts); every variant
trains once per seed on one activation cache and is scored on held-out rows of that cache (in
domain) and of a cache of other text (out of domain, e.g. Gutenberg for a Wikipedia-trained SAE):
FVE, dead fraction on those rows, L0, expert-load CV, duplication, training tokens/s, encoder
FLOPs per token and, with ``--loss-recovered``, loss recovered and KL in the LM on held-out windows
of both domains. Rows are appended to ``OUT/runs.csv`` as they finish (a rerun skips done rows);
the summary prints mean ± 95% t-interval over seeds.

    python benchmarks/recipe.py --train runs/cache_wiki --other runs/cache_gut --study alpha --out runs/recipe
"""
from __future__ import annotations

import argparse
import csv
import math
import time
from pathlib import Path

import torch

import switchsae as ss
from switchsae import host
from switchsae.analysis.geometry import expert_duplication
from switchsae.config import TrainConfig
from switchsae.evaluate import evaluate
from switchsae.pipeline import lm_metrics
from switchsae.sources.cache import ActivationCache

M0, K = 4096, 32
#: every study ran without the router z-loss, the library's default since section 9 (its variants set it)
SWITCH8 = dict(arch="switch", width=8 * M0, n_experts=8, z_loss_coeff=0.0)
TOPK = dict(arch="topk", width=M0)

#: the recipe the studies above decide (alpha, lr law, AuxK), used by the routing study
RECIPE = {"aux_coeff": 0.1, "lr_width": "expert"}
TOPK_RECIPE: dict = {}
#: the finalists of the length study and after, FLOP-matched at M0 (Switch with the recipe above)
SWITCH4_RECIPE = {**SWITCH8, **RECIPE, "width": 4 * M0, "n_experts": 4}
SWITCH8_RECIPE = {**SWITCH8, **RECIPE}
FINALISTS = {"topk": TOPK, "switch4": SWITCH4_RECIPE, "switch8": SWITCH8_RECIPE}
#: the training of the clip, balance and batch studies: 8x the lr law, 720 steps, the gradient norm clipped at 1
LONG_CLIPPED = {"lr": 3.2e-3, "steps": 720, "grad_clip": 1.0}
#: section 7's Switch training: that, with the library's default load-balance weight
ALPHA3_CLIPPED = {"aux_coeff": 3.0, **LONG_CLIPPED}
#: section 10's: that, with the library's default router z-loss too
Z_ALPHA3_CLIPPED = {"z_loss_coeff": 1e-3, **ALPHA3_CLIPPED}

STUDIES: dict[str, dict[str, dict]] = {
    "alpha": {  # the load-balance weight, relative to the MSE of activations at mean norm sqrt(d)
        "alpha=3": {**SWITCH8, "aux_coeff": 3.0, "lr_width": "expert"},
        "alpha=0.1": {**SWITCH8, "aux_coeff": 0.1, "lr_width": "expert"},
        "alpha=0.01": {**SWITCH8, "aux_coeff": 0.01, "lr_width": "expert"},
    },
    "lr": {  # the lr law's width for Switch (alpha=0.1 of the alpha study is lr expert), constant lr
        "lr total": {**SWITCH8, "aux_coeff": 0.1, "lr_width": "total"},
        "lr expert, constant": {**SWITCH8, "aux_coeff": 0.1, "lr_width": "expert", "lr_decay_frac": 0.0},
        "lr 2x expert": {**SWITCH8, "aux_coeff": 0.1, "lr": 8e-4},
        "lr 4x expert": {**SWITCH8, "aux_coeff": 0.1, "lr": 1.6e-3},
    },
    "auxk": {  # Gao et al.'s dead-latent loss (per expert for Switch), at the lr the lr study found
        "topk lr 2x": {**TOPK, "lr": 8e-4},
        "top2 8x2048 lr 2x": {**SWITCH8, "width": 8 * 2048, "router": "top_e", "experts_per_token": 2,
                              "aux_coeff": 0.1, "lr": 8e-4},
        "switch8 lr 2x auxk": {**SWITCH8, "aux_coeff": 0.1, "lr": 8e-4, "auxk_coeff": 1 / 32},
        "topk": {**TOPK},
        "switch4 lr 2x": {**SWITCH8, "width": 4 * M0, "n_experts": 4, "aux_coeff": 0.1, "lr": 8e-4},
        "topk lr 2x auxk": {**TOPK, "lr": 8e-4, "auxk_coeff": 1 / 32},
    },
    "length": {  # the finalists at 4x to 32x the lr law, and one pass (240 steps) against three (720);
        # 2x at 240 steps is in the auxk and lr studies
        **{f"{name} lr {mult}x steps {steps}": {**settings, "lr": 4e-4 * mult, "steps": steps}
           for steps, mult in ((240, 4), (240, 8), (240, 16), (240, 32), (720, 4), (720, 8))
           for name, settings in FINALISTS.items()},
    },
    "clip": {  # gradient-norm clipping at 1 on the length study's best 720-step runs (8x the law), and
        # per-expert AuxK beside it: paired with those runs (same seeds, same batches)
        **{f"{name} lr 8x steps 720 clip 1": {**settings, **LONG_CLIPPED}
           for name, settings in (*FINALISTS.items(),
                                  ("switch4 auxk", {**SWITCH4_RECIPE, "auxk_coeff": 1 / 32}),
                                  ("switch8 auxk", {**SWITCH8_RECIPE, "auxk_coeff": 1 / 32}),
                                  ("topk bf16 moments", {**TOPK, "adam_moments": "bf16"}),
                                  ("switch8 bf16 moments", {**SWITCH8_RECIPE, "adam_moments": "bf16"}))},
    },
    "balance": {  # a stronger load-balance weight against the imbalance (load CV 1.1-1.7) that kills latents at 8x;
        # 10: the less-used experts hold most of the dead latents even at 3 (report section 8)
        **{f"{name} alpha {alpha} lr 8x steps 720 clip 1": {**settings, "aux_coeff": alpha, **LONG_CLIPPED}
           for alpha in (1.0, 3.0, 10.0)
           for name, settings in (("switch4", SWITCH4_RECIPE), ("switch8", SWITCH8_RECIPE))},
        "topk lr 8x steps 720 clip 1": {**TOPK, **LONG_CLIPPED},  # for the reverse runs
    },
    "revive": {  # per-expert AuxK against the 40-53% dead latents of Switch 8 at the balance study's alpha = 3
        # (the clip study's AuxK ran at alpha = 0.1, where the router collapsed)
        **{f"{name} alpha 3 auxk {label} lr 8x steps 720 clip 1": {**settings, "auxk_coeff": coeff, **ALPHA3_CLIPPED}
           for label, coeff in (("1/32", 1 / 32), ("1/8", 1 / 8))
           for name, settings in (("switch8", SWITCH8_RECIPE), ("switch4", SWITCH4_RECIPE))},
    },
    "routing7": {  # two active experts per token at section 7's training (alpha = 3, 8x, 720 steps, clipped): out of
        # domain, when top-1 picks the wrong expert the best one is its second choice 95% of the time
        "top2 8x2048 alpha 3 lr 8x steps 720 clip 1": {**SWITCH8_RECIPE, "width": 8 * 2048, "router": "top_e",
                                                        "experts_per_token": 2, **ALPHA3_CLIPPED},
        "top2 16x2048 alpha 3 lr 8x steps 720 clip 1": {**SWITCH8_RECIPE, "width": 16 * 2048, "n_experts": 16, "router": "top_e",
                                                         "experts_per_token": 2, **ALPHA3_CLIPPED},
        "shared + top1 8x2048 alpha 3 lr 8x steps 720 clip 1": {**SWITCH8_RECIPE, "width": 9 * 2048, "shared_expert": True,
                                                                 **ALPHA3_CLIPPED},
    },
    "strategies7": {  # the routing study's other strategies at section 7's training; with routing7 and the balance
        # study's top-1 and TopK rows, every strategy at one recipe
        "expert choice 8x4096 alpha 3 lr 8x steps 720 clip 1": {**SWITCH8_RECIPE, "router": "expert_choice", **ALPHA3_CLIPPED},
        "hash 8x4096 lr 8x steps 720 clip 1": {**SWITCH8_RECIPE, "router": "hash", **ALPHA3_CLIPPED},
        "sinkhorn 8x4096 lr 8x steps 720 clip 1": {**SWITCH8_RECIPE, "router": "sinkhorn", **ALPHA3_CLIPPED},
        "top1 + z-loss 8x4096 alpha 3 lr 8x steps 720 clip 1": {**SWITCH8_RECIPE, **Z_ALPHA3_CLIPPED},
        "top1 + z-loss 4x4096 alpha 3 lr 8x steps 720 clip 1": {**SWITCH4_RECIPE, **Z_ALPHA3_CLIPPED},
        "top1 16x256 (fixed width) alpha 3 lr 8x steps 720 clip 1": {**SWITCH8_RECIPE, "width": M0, "n_experts": 16,
                                                                     **ALPHA3_CLIPPED},
    },
    "moments7": {  # bf16 Adam moments (1.12x Switch 8's tokens/s) at section 7's training with the z-loss default
        "topk bf16 moments lr 8x steps 720 clip 1": {**TOPK, "adam_moments": "bf16", **LONG_CLIPPED},
        "top1 + z-loss 8x4096 bf16 moments alpha 3 lr 8x steps 720 clip 1": {**SWITCH8_RECIPE, **Z_ALPHA3_CLIPPED, "adam_moments": "bf16"},
    },
    "gut1m7": {  # against Switch 8's level out of domain after three passes over 1M Gutenberg tokens (with the z-loss):
        # half the lr (less fitting of the few distinct tokens each expert sees) and a weaker balance weight
        "top1 + z-loss 8x4096 alpha 3 lr 4x steps 720 clip 1": {**SWITCH8_RECIPE, **Z_ALPHA3_CLIPPED, "lr": 1.6e-3},
        "top1 + z-loss 8x4096 alpha 1 lr 8x steps 720 clip 1": {**SWITCH8_RECIPE, **Z_ALPHA3_CLIPPED, "aux_coeff": 1.0},
        "topk lr 4x steps 720 clip 1": {**TOPK, **LONG_CLIPPED, "lr": 1.6e-3},
    },
    "gut1m8": {  # the same target: a longer lr decay (less fitting late in the third pass, for every SAE) and
        # Sinkhorn, the closest Switch 8 there (section 11), with the z-loss or at half the lr
        "topk lr 8x steps 720 clip 1 decay 0.5": {**TOPK, **LONG_CLIPPED, "lr_decay_frac": 0.5},
        "top1 + z-loss 8x4096 alpha 3 lr 8x steps 720 clip 1 decay 0.5": {**SWITCH8_RECIPE, **Z_ALPHA3_CLIPPED,
                                                                           "lr_decay_frac": 0.5},
        "sinkhorn + z-loss 8x4096 lr 8x steps 720 clip 1": {**SWITCH8_RECIPE, "router": "sinkhorn", **Z_ALPHA3_CLIPPED},
        "sinkhorn 8x4096 lr 4x steps 720 clip 1": {**SWITCH8_RECIPE, "router": "sinkhorn", **ALPHA3_CLIPPED,
                                                   "lr": 1.6e-3},
    },
    "transfer": {  # two active dictionaries per token (shared + routed, top-2) and hash routing, at 4x the law
        "shared + top1 8x2048 lr 4x": {**SWITCH8, **RECIPE, "width": 9 * 2048, "shared_expert": True, "lr": 1.6e-3},
        "shared + top1 4x2048 lr 4x": {**SWITCH8, **RECIPE, "width": 5 * 2048, "n_experts": 4,
                                       "shared_expert": True, "lr": 1.6e-3},
        "top2 8x2048 lr 4x": {**SWITCH8, **RECIPE, "width": 8 * 2048, "router": "top_e", "experts_per_token": 2,
                              "lr": 1.6e-3},
        "hash 8x4096 lr 4x": {**SWITCH8, **RECIPE, "router": "hash", "lr": 1.6e-3},
    },
    "batch": {  # batch-size sensitivity at section 7's recipe and token budget (720 x 4096 tokens), the lr scaled
        # as sqrt(B); batch 4096 is the balance/clip studies' run
        **{f"{name} batch {batch}": {**settings, "batch_size": batch, "steps": 720 * 4096 // batch,
                                     "lr": 3.2e-3 * (batch / 4096) ** 0.5, "grad_clip": 1.0}
           for name, settings in (("topk", TOPK), ("switch4 alpha 3", {**SWITCH4_RECIPE, "aux_coeff": 3.0}))
           for batch in (1024, 16384)},
    },
    "routing": {  # every strategy FLOP-matched to TopK-4096: e routed experts of 4096/e latents, k = 32
        "top1 8x4096": {**SWITCH8, **RECIPE},
        "top2 8x2048": {**SWITCH8, **RECIPE, "width": 8 * 2048, "router": "top_e", "experts_per_token": 2},
        "shared + top1 8x2048": {**SWITCH8, **RECIPE, "width": 9 * 2048, "shared_expert": True},
        "expert choice 8x4096": {**SWITCH8, **RECIPE, "router": "expert_choice"},
        "hash 8x4096": {**SWITCH8, **RECIPE, "router": "hash"},
        "sinkhorn 8x4096": {**SWITCH8, **RECIPE, "router": "sinkhorn"},
        "top1 + z-loss 8x4096": {**SWITCH8, **RECIPE, "z_loss_coeff": 1e-3},
        "top1 16x256 (fixed width)": {**SWITCH8, **RECIPE, "width": M0, "n_experts": 16},
        "topk 4096": {**TOPK, **TOPK_RECIPE},
    },
}
TRAIN_KEYS = set(TrainConfig.__dataclass_fields__)
COLUMNS = ["study", "variant", "seed", "fve_in", "fve_out", "dead_in", "dead_out", "l0", "load_cv_in", "duplication",
           "tok_per_s", "encoder_flops", "loss_recovered_in", "kl_in", "loss_recovered_out", "kl_out"]


def split_settings(variant: dict) -> tuple[dict, dict]:
    """SAE settings and TrainConfig overrides of a variant."""
    return ({k: v for k, v in variant.items() if k not in TRAIN_KEYS},
            {k: v for k, v in variant.items() if k in TRAIN_KEYS})


def batches(cache: ActivationCache, sae, batch_size: int = 4096):
    return cache.eval_batches(batch_size, token_ids=True) if sae.needs_token_ids else cache.eval_batches(batch_size)


def variant_slug(name: str) -> str:
    """A folder name for a variant's name."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def run_variant(name: str, variant: dict, seed: int, train_cache: ActivationCache, other: ActivationCache,
                args) -> dict:
    """Train one variant with one seed and score it in and out of domain (saved with ``--save``)."""
    sae_settings, train_settings = split_settings(variant)
    cfg = ss.SAEConfig.from_flat(d_model=train_cache.d_model, k=K, model_name=train_cache.manifest["model"],
                                 hook_name=train_cache.manifest["hook"], **sae_settings)
    # the studies before "clip" predate clipping by default: unclipped unless a variant says so
    train_cfg = TrainConfig(**{"steps": args.steps, "batch_size": 4096, "normalize": True, "seed": seed, "grad_clip": 0.0,
                               "log_every": args.steps, "checkpoint_every": 0, "matmul_dtype": args.matmul_dtype,
                               "shuffle_buffer_mb": args.shuffle_mb, "shuffle_chunk_mb": args.shuffle_chunk_mb,
                               **train_settings})
    started = time.perf_counter()
    run_dir = Path(args.out) / "runs" / f"{variant_slug(name)}-seed{seed}" if args.save else None
    sae = ss.train(cfg, train_cache, train_cfg, run_dir=run_dir, force=True, progress=False)
    seconds = time.perf_counter() - started
    inside = evaluate(sae, batches(train_cache, sae), progress=False)
    outside = evaluate(sae, batches(other, sae), progress=False)
    row = {"fve_in": inside["fve"], "fve_out": outside["fve"], "dead_in": inside["dead_frac"],
           "dead_out": outside["dead_frac"], "l0": inside["l0"], "load_cv_in": inside.get("expert_load_cv", ""),
           "duplication": expert_duplication(sae.W_dec, sae.cfg.n_blocks)["frac_above"] if sae.cfg.n_blocks > 1 else "",
           "tok_per_s": train_cfg.steps * train_cfg.batch_size / seconds,
           "encoder_flops": sae.flops()["forward"] - 2 * K * sae.cfg.d_model}
    if args.loss_recovered:
        for name, cache in (("in", train_cache), ("out", other)):
            lm = lm_metrics(sae, cache, args.eval_tokens, progress=False)
            row.update({f"loss_recovered_{name}": lm["loss_recovered"], f"kl_{name}": lm["kl_sae"]})
    return row


def t_interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t interval (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    t = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776}.get(n, 2.0)
    return mean, t * sd / math.sqrt(n)


def summarise(rows: list[dict], study: str) -> str:
    """Markdown table: per variant, mean ± 95% interval of each score over its seeds."""
    shown = ["fve_in", "fve_out", "dead_in", "loss_recovered_in", "loss_recovered_out", "load_cv_in", "duplication",
             "tok_per_s"]
    lines = [f"| variant | seeds | {' | '.join(shown)} |", "|" + "---|" * (len(shown) + 2)]
    for variant in dict.fromkeys(r["variant"] for r in rows if r["study"] == study):
        mine = [r for r in rows if r["study"] == study and r["variant"] == variant]
        cells = []
        for column in shown:
            values = [float(r[column]) for r in mine if r.get(column) not in ("", None)]
            if not values:
                cells.append("—")
                continue
            mean, half = t_interval(values)
            digits = 0 if column == "tok_per_s" else 3
            cells.append(f"{mean:.{digits}f} ± {half:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}")
        lines.append(f"| {variant} | {len(mine)} | {' | '.join(cells)} |")
    return "\n".join(lines)


def plot(rows: list[dict], study: str, path: Path) -> None:
    """Bars of FVE in and out of domain per variant, with 95% intervals over seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(r["variant"] for r in rows if r["study"] == study))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(variants)), 4))
    for offset, (column, label) in enumerate((("fve_in", "held-out, same domain"), ("fve_out", "other domain"))):
        stats = [t_interval([float(r[column]) for r in rows if r["study"] == study and r["variant"] == v])
                 for v in variants]
        ax.bar([i + 0.4 * offset for i in range(len(variants))], [m for m, _ in stats], 0.4,
               yerr=[h for _, h in stats], capsize=3, label=label)
    ax.set_xticks([i + 0.2 for i in range(len(variants))], variants, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("FVE")
    lows = [float(r[c]) for r in rows if r["study"] == study for c in ("fve_in", "fve_out")]
    ax.set_ylim(max(0.0, min(lows) - 0.05), min(1.0, max(lows) + 0.03))
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(f"study {study}: mean and 95% interval over seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", required=True, help="activation cache to train on")
    parser.add_argument("--other", required=True, help="activation cache of other text (out-of-domain scores)")
    parser.add_argument("--study", required=True, choices=STUDIES)
    parser.add_argument("--variants", nargs="*", help="only these variants of the study (default: all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--matmul-dtype", default="auto")
    parser.add_argument("--loss-recovered", action="store_true")
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--report-only", action="store_true", help="train nothing: the table and plot of OUT/runs.csv")
    parser.add_argument("--save", action="store_true", help="keep each trained SAE under OUT/runs/")
    parser.add_argument("--shuffle-mb", type=int, default=1024, help="the training stream's shuffle buffer (MiB)")
    parser.add_argument("--shuffle-chunk-mb", type=int, default=0,
                        help="chunks the buffer is filled with (MiB; 0: whole shards, as every study before the "
                             "library's default of 16 MiB; report section 9)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "runs.csv"
    rows = list(csv.DictReader(results.open())) if results.exists() else []
    train_cache = ActivationCache(args.train)
    other = ActivationCache(args.other)
    print(f"host: {host.cpu_name()}, {torch.get_num_threads()} threads; "
          f"train {args.train}, other domain {args.other}")
    for variant, settings in STUDIES[args.study].items():
        if args.report_only or (args.variants and variant not in args.variants):
            continue
        for seed in args.seeds:
            if any(r["study"] == args.study and r["variant"] == variant and int(r["seed"]) == seed for r in rows):
                continue
            row = {"study": args.study, "variant": variant, "seed": seed,
                   **run_variant(variant, settings, seed, train_cache, other, args)}
            rows.append({k: str(v) for k, v in row.items()})
            with results.open("w", newline="") as fh:
                writer = csv.DictWriter(fh, COLUMNS, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(rows)
            print(f"{variant} seed {seed}: fve in {row['fve_in']:.4f} out {row['fve_out']:.4f} "
                  f"dead {row['dead_in']:.3f} {row['tok_per_s']:.0f} tok/s", flush=True)
    print(summarise(rows, args.study))
    plot(rows, args.study, out / f"{args.study}.png")


if __name__ == "__main__":
    main()
