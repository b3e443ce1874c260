"""SAEBench's core eval on SAEs exported by ``switchsae export --format saelens``, offline.

Runs in the SAEBench virtualenv (``bash scripts/install_saebench.sh``) with the repository on
PYTHONPATH (for Switch SAEs: ``switchsae.apps.saelens_switch`` registers them in SAELens)::

    ~/.cache/switchsae/saebench-venv/bin/python benchmarks/saebench_core.py \\
        --model-dir ~/.cache/switchsae/models/smollm2-135m --cache CACHE --out results.json EXPORT [EXPORT ...]

What it does, and why each step is needed to stay off the hub:

1. The model. SAEBench's evals build ``HookedTransformer.from_pretrained(model_name)``, which only
   accepts TransformerLens's list of official names and downloads them; SmolLM2 is not on it. The
   same HookedTransformer is built here from the local Hugging Face folder that
   ``switchsae.sources.models`` converts the embedded GGUF into (TransformerLens reads a local
   ``config.json``), without weight processing (SAEBench's ``from_pretrained_no_processing``), and
   checked against the Hugging Face model: the hook's activations and the logits.
2. The SAE: ``SAE.load_from_disk`` of our export (SAELens's own loader), through SAEBench's
   ``load_and_format_sae``.
3. The tokens: the held-out windows of a switchsae activation cache (the last ``--held-out`` of its
   rows, as ``switchsae eval`` holds them out), as a tokenized ``datasets.Dataset``, so SAEBench
   reads the very token windows our evaluation reads. SAEBench's default is a hub data set.
4. ``sae_bench.evals.core.main.run_evals`` with the BOS/EOS/pad tokens ignored (our SAEs never saw
   the attention sink) and every metric group on.

Writes ``--out``: per export, SAEBench's scalar metrics plus the model check.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # anything that would reach the hub fails instead
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformer_lens.loading_from_pretrained as tl_loading  # noqa: E402
from datasets import Dataset  # noqa: E402
from sae_lens import SAE  # noqa: E402
from sae_lens.training.activations_store import ActivationsStore  # noqa: E402
from transformer_lens import HookedTransformer  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import switchsae.apps.saelens_switch  # noqa: E402,F401  registers "switch" with SAELens
from sae_bench.evals.core.eval_config import CoreEvalConfig  # noqa: E402
from sae_bench.evals.core.main import run_evals  # noqa: E402
from sae_bench.sae_bench_utils.general_utils import load_and_format_sae  # noqa: E402


def local_hooked_transformer(model_dir: Path) -> tuple[HookedTransformer, AutoModelForCausalLM]:
    """TransformerLens's HookedTransformer of a local Hugging Face folder, unprocessed, and the HF model."""
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    cfg = tl_loading.get_pretrained_model_config(str(model_dir), hf_cfg=hf.config.to_dict(), fold_ln=False,
                                                 device="cpu", dtype=torch.float32)
    state_dict = tl_loading.get_pretrained_state_dict(str(model_dir), cfg, hf, dtype=torch.float32)
    model = HookedTransformer(cfg, tokenizer, move_to_device=True)
    model.load_and_process_state_dict(state_dict, fold_ln=False, center_writing_weights=False,
                                      center_unembed=False, refactor_factored_attn_matrices=False)
    return model.eval(), hf


@torch.no_grad()
def model_check(model: HookedTransformer, hf, tokens: torch.Tensor, hook: str) -> dict:
    """Max |diff| of the HookedTransformer against the HF model on ``tokens``: logits and the hook
    ``blocks.L.hook_resid_post`` (HF's hidden state L + 1)."""
    layer = int(hook.split(".")[1])
    ref = hf(tokens, output_hidden_states=True)
    logits, cache = model.run_with_cache(tokens, names_filter=[hook])
    return {"logits_max_abs_diff": (logits - ref.logits).abs().max().item(),
            "logits_max_abs": ref.logits.abs().max().item(),
            "hook_max_abs_diff": (cache[hook] - ref.hidden_states[layer + 1]).abs().max().item(),
            "hook_max_abs": ref.hidden_states[layer + 1].abs().max().item()}


def held_out_windows(cache_dir: Path, held_out: float) -> np.ndarray:
    """Token windows ``[n, context]`` holding the cache's last ``held_out`` fraction of rows."""
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    per_window = manifest["context_length"] - manifest["drop_first"]
    windows = np.concatenate([np.fromfile(cache_dir / shard["windows"], dtype=np.int32)
                              .reshape(-1, manifest["context_length"]) for shard in manifest["shards"]])
    first = math.ceil(manifest["n_tokens"] * (1 - held_out) / per_window)
    return windows[first:]


def evaluate(export: Path, model: HookedTransformer, windows: np.ndarray, cfg: CoreEvalConfig,
             ignore: set[int | None]) -> dict:
    sae = SAE.load_from_disk(export, device="cpu")
    sae.cfg.metadata.prepend_bos = True  # the windows start with BOS already (tokenized data is not re-prefixed)
    sae.cfg.metadata.context_size = windows.shape[1]
    _, sae, _ = load_and_format_sae("switchsae", sae, "cpu")
    dataset = Dataset.from_dict({"tokens": windows.tolist()})
    store = ActivationsStore.from_sae(model, sae, dataset=dataset, context_size=windows.shape[1],
                                      streaming=False, store_batch_size_prompts=cfg.batch_size_prompts,
                                      n_batches_in_buffer=4, device="cpu")
    start = time.perf_counter()
    scalars, _ = run_evals(sae, store, model, cfg, ignore_tokens=ignore)
    return {"saelens_class": type(sae).__name__, "d_sae": sae.cfg.d_sae, "seconds": round(time.perf_counter() - start, 1),
            "metrics": scalars}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("exports", nargs="+", type=Path, help="SAELens folders written by switchsae export")
    parser.add_argument("--model-dir", type=Path, required=True, help="local Hugging Face model folder")
    parser.add_argument("--cache", type=Path, required=True, help="switchsae activation cache (with token ids)")
    parser.add_argument("--held-out", type=float, default=0.1, help="fraction of the cache's rows held out")
    parser.add_argument("--batches", type=int, default=8, help="reconstruction batches (of --prompts windows)")
    parser.add_argument("--prompts", type=int, default=8, help="windows per batch")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    model, hf = local_hooked_transformer(args.model_dir)
    windows = held_out_windows(args.cache, args.held_out)
    hook = json.loads((args.exports[0] / "cfg.json").read_text())["metadata"]["hook_name"]
    results = {"model_check": model_check(model, hf, torch.from_numpy(windows[:2]).long(), hook),
               "held_out_windows": int(len(windows)), "tokens_evaluated": args.batches * args.prompts * windows.shape[1]}
    del hf
    tokenizer = model.tokenizer
    ignore = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    cfg = CoreEvalConfig(model_name=str(args.model_dir), batch_size_prompts=args.prompts,
                         n_eval_reconstruction_batches=args.batches, n_eval_sparsity_variance_batches=args.batches,
                         context_size=windows.shape[1], compute_kl=True, compute_ce_loss=True, compute_l2_norms=True,
                         compute_sparsity_metrics=True, compute_variance_metrics=True, compute_featurewise_density_statistics=False,
                         compute_featurewise_weight_based_metrics=False, exclude_special_tokens_from_reconstruction=True)
    for export in args.exports:
        results[export.name] = evaluate(export, model, windows, cfg, ignore)
        print(export.name, json.dumps(results[export.name]["metrics"], indent=1))
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
