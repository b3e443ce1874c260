"""dictionary_learning's TopK SAE, trained by its own ``TopKTrainer.update(step, x)``.

The trainer's update is used as is: geometric-median ``b_dec`` at step 0, MSE + AuxK loss,
gradient component parallel to the decoder rows removed, gradient-norm clipping at 1.0
(hard-coded), Adam, decoder renormalised after each step. We set ``warmup_steps=0`` and no
``decay_start`` (constant lr). Its AuxK loss only acts on latents dead for 10M tokens, and its
inference threshold starts at step 1000, so neither is active in a short benchmark.
"""
from __future__ import annotations

import common
from dictionary_learning.trainers.top_k import TopKTrainer


def main() -> None:
    args = common.worker_parser(__doc__.splitlines()[0]).parse_args()
    common.setup(args)
    batches = common.TrainBatches(args.train, args.batch_size, args.steps, args.warmup)
    trainer = TopKTrainer(steps=args.steps, activation_dim=batches.d_model, dict_size=args.width, k=args.k,
                          layer=0, lm_name="benchmark", lr=args.lr, warmup_steps=0, decay_start=None,
                          seed=args.seed, device="cpu")
    common.run_loop(trainer.update, batches)

    ae = trainer.ae.eval()  # encode is the training-time TopK path (the threshold is not yet set)
    notes = ("grad-norm clip 1.0 (forced); AuxK (alpha 1/32) inactive: needs 10M tokens dead; "
             "b_enc; geometric-median b_dec at step 0")
    common.score_and_report("dictlearn", "dictionary-learning", common.encode_decode(ae), args, batches, notes)


if __name__ == "__main__":
    main()
