"""SAELens's TopK SAE (``TopKTrainingSAE``), trained by its own ``SAETrainer.fit()``.

``SAETrainer`` takes any iterator of activation batches as its data provider, so its whole
loop runs unchanged on the harness's batches: MSE + AuxK loss, gradient-norm clipping at 1.0
(hard-coded), Adam, its lr scheduler (``constant``, no warm-up: the config's defaults).
SAELens's TopK recipe differs from ours: no decoder renormalisation (TopK selection rescales
pre-activations by the decoder row norms instead), decoder rows initialised to norm 0.1, zero
``b_dec``, an encoder bias. AuxK acts on latents dead for 1000 steps, so not in a short run.
"""
from __future__ import annotations

import os
os.environ.setdefault("WANDB_MODE", "disabled")

import common  # noqa: E402
from sae_lens.config import LoggingConfig, SAETrainerConfig  # noqa: E402
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig  # noqa: E402
from sae_lens.training.sae_trainer import SAETrainer  # noqa: E402


def main() -> None:
    args = common.worker_parser(__doc__.splitlines()[0]).parse_args()
    common.setup(args)
    batches = common.TrainBatches(args.train, args.batch_size, args.steps, args.warmup)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=batches.d_model, d_sae=args.width, k=args.k,
                                                dtype="float32", device="cpu"))
    trainer_cfg = SAETrainerConfig(total_training_samples=args.steps * args.batch_size,
                                   train_batch_size_samples=args.batch_size, lr=args.lr,
                                   lr_end=args.lr / 10,  # the runner config's default; unused by "constant"
                                   lr_scheduler_name="constant", lr_warm_up_steps=0, lr_decay_steps=0,
                                   adam_beta1=0.9, adam_beta2=0.999, device="cpu", autocast=False,
                                   n_checkpoints=0, save_final_checkpoint=False,
                                   logger=LoggingConfig(log_to_wandb=False))
    trainer = SAETrainer(trainer_cfg, sae, data_provider=iter(batches))
    trainer.fit()
    batches.stop()

    sae.eval()
    notes = ("grad-norm clip 1.0 (forced); AuxK (coef 1) inactive: needs 1000 dead steps; "
             "no decoder renorm (TopK on pre-acts x decoder norms); W_dec init norm 0.1; zero b_dec; b_enc")
    common.score_and_report("saelens", "sae-lens", common.encode_decode(sae), args, batches, notes)


if __name__ == "__main__":
    main()
