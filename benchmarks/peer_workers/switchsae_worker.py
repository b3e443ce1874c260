"""Our dense TopK SAE, trained by ``switchsae.train.train`` on the harness's batches.

``train`` iterates the batch stream twice: batch 0 once for the initialisation (geometric-median
``b_pre``; that is our recipe), then every batch for the loop. Only the loop is timed (see
``common.TrainBatches``). Adam, constant learning rate unless ``--lr-decay-frac``, no auxiliary loss.
"""
from __future__ import annotations

from importlib.metadata import version

import common
from switchsae.config import SAEConfig, TrainConfig
from switchsae.evaluate import evaluate
from switchsae.train import train


def main() -> None:
    parser = common.worker_parser(__doc__.splitlines()[0])
    parser.add_argument("--matmul-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--sparse-updates", action="store_true", help="row-sparse gradients + lazy Adam")
    parser.add_argument("--experts", type=int, default=0,
                        help="a Switch SAE of this many experts of --width latents each (FLOP-matched to TopK --width)")
    parser.add_argument("--normalize", action="store_true", help="train on activations scaled to mean norm sqrt(d)")
    parser.add_argument("--encoder-bias", action="store_true", help="TopK with a learned encoder bias b_enc")
    parser.add_argument("--grad-clip", type=float, default=0.0, help="clip the gradient's global norm (0: off)")
    parser.add_argument("--lr-decay-frac", type=float, default=0.0,
                        help="linear lr decay to 0 over this last fraction of steps (our default recipe: 0.2)")
    args = parser.parse_args()
    common.setup(args)
    batches = common.TrainBatches(args.train, args.batch_size, args.steps, args.warmup)
    shape = (dict(arch="switch", width=args.experts * args.width, n_experts=args.experts, aux_coeff=0.1)
             if args.experts else dict(arch="topk", width=args.width, encoder_bias=args.encoder_bias))
    sae_cfg = SAEConfig.from_flat(d_model=batches.d_model, k=args.k, **shape)
    train_cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, lr_decay_frac=args.lr_decay_frac,
                            grad_clip=args.grad_clip, seed=args.seed, checkpoint_every=0, log_every=args.steps, normalize=args.normalize,
                            matmul_dtype=args.matmul_dtype, sparse_updates=args.sparse_updates)
    sae = train(sae_cfg, batches, train_cfg, progress=False)
    batches.stop()

    sae.eval()
    rows = common.load_eval(args.eval)

    def reconstruct(x):
        out = sae(x)
        return out.x_hat, (out.latents.values, out.latents.indices)

    args.width = sae.cfg.width  # the dead fraction counts every latent of every expert
    scores = common.held_out_scores(reconstruct, args)
    own = evaluate(sae, rows.split(args.batch_size), progress=False)
    name = "switchsae" + ("-bf16" if args.matmul_dtype == "bfloat16" else "") + ("-sparse" if args.sparse_updates else "")
    notes = "geometric-median b_pre from batch 0; W_enc = W_dec^T init; no AuxK"
    if args.experts:
        notes += f"; Switch {args.experts} x {sae.cfg.width // args.experts}, top-1 router, alpha 0.1"
    if args.normalize:
        notes += "; --normalize"
    notes += "; encoder bias b_enc" if args.encoder_bias else "; no b_enc"
    if args.grad_clip:
        notes += f"; gradient norm clipped at {args.grad_clip:g}"
    if args.lr_decay_frac:
        notes += f"; lr decays over the last {args.lr_decay_frac:.0%} of steps"
    if args.matmul_dtype == "bfloat16":
        notes += "; bf16 selection matmul"
    common.report(name, version("switchsae"), batches, scores, notes, fvu_own_evaluate=own["fvu"])


if __name__ == "__main__":
    main()
