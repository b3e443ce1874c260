"""EleutherAI sparsify's ``SparseCoder`` (TopK), trained by the step of its ``Trainer``.

sparsify's ``Trainer.fit()`` only consumes a language model plus a token dataset (its SAEs
train inside forward hooks), so this worker runs the body of that hook and of the step that
follows it, through sparsify's public ``SparseCoder`` API, on the harness's batches:

* step 0: ``b_dec`` set to the batch mean (its init);
* every step: decoder renormalised (``set_decoder_norm_to_unit_norm``), forward with its fused
  TopK encoder and ``embedding_bag`` decoder (no Triton on CPU), loss = its batch FVU, backward,
  ``remove_gradient_parallel_to_decoder_directions``, optimizer step, ``zero_grad``.

Optimiser: its ``optimizer="adam"`` choice (``torch.optim.Adam`` when bitsandbytes is absent,
default betas 0.9/0.999) at the harness's lr. Its Trainer would add a linear warm-up
(``lr_warmup_steps``, default 1000) and a linear decay to 0 over the dataset; both are left out
here for equal settings. Its default optimizer is ``signum`` (SignSGD + schedule-free), not Adam.
AuxK is off by default (``auxk_alpha=0``), as here.
"""
from __future__ import annotations

import torch

import common
from sparsify import SparseCoder, SparseCoderConfig


def main() -> None:
    args = common.worker_parser(__doc__.splitlines()[0]).parse_args()
    common.setup(args)
    batches = common.TrainBatches(args.train, args.batch_size, args.steps, args.warmup)
    torch.set_float32_matmul_precision("high")  # as Trainer.fit() does (no effect on CPU fp32)
    sae = SparseCoder(batches.d_model, SparseCoderConfig(num_latents=args.width, k=args.k), device="cpu",
                      dtype=torch.float32)
    optimizer = torch.optim.Adam(sae.parameters(), lr=args.lr, betas=(0.9, 0.999))
    did_fire = torch.zeros(args.width, dtype=torch.bool)
    tokens_since_fired = torch.zeros(args.width, dtype=torch.long)

    def step(i: int, x: torch.Tensor) -> None:
        if i == 0:
            sae.b_dec.data = x.mean(0).to(sae.dtype)
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x, total_variance=(x - x.mean(0)).pow(2).sum())
        did_fire[out.latent_indices.flatten()] = True
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():  # its dead-latent bookkeeping
            tokens_since_fired.add_(x.shape[0])
            tokens_since_fired[did_fire] = 0
            did_fire.zero_()

    common.run_loop(step, batches)

    sae.eval()

    @torch.no_grad()
    def reconstruct(x):
        acts, indices, _ = sae.encode(x)
        return sae.decode(acts, indices), (acts, indices)

    notes = ("loss = batch FVU; Trainer's lr warm-up/decay left out; default optimizer is signum, Adam chosen; "
             "AuxK off (its default); mean-init b_dec; b_enc")
    common.score_and_report("sparsify", "eai-sparsify", reconstruct, args, batches, notes)


if __name__ == "__main__":
    main()
