"""The whole path as library calls: evaluate a run (optionally inside the LM), and the demo.

``switchsae eval`` and ``switchsae demo`` are thin wrappers around :func:`evaluate_run` and
:func:`run_demo`; a notebook can call the same functions.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch

from switchsae.evaluate import evaluate
from switchsae.saes import SparseAutoencoder
from switchsae.saes.io import load_sae, write_json_atomic
from switchsae.sources.activations import ActivationSource, open_activations


def held_out_windows(cache, tokenizer, eval_tokens: int) -> torch.Tensor:
    """About ``eval_tokens`` tokens of windows of the cache's corpus whose activations are all in
    its held-out split (at least one window).

    The cache stores whole windows in corpus order and holds out its last rows, so the windows
    from ``ceil(n_train / rows_per_window)`` on were never trained on. They are read from the
    token ids stored with the cache; only caches from before those existed re-tokenise the corpus.
    """
    from switchsae.sources.text import token_windows

    manifest = cache.manifest
    rows_per_window = manifest["context_length"] - manifest["drop_first"]
    first = -(-cache.n_train // rows_per_window)
    n_windows = max(1, eval_tokens // rows_per_window)
    if cache.has_token_ids:
        windows = list(torch.from_numpy(cache.windows()[first:first + n_windows].astype("int64")))
    else:
        stream = token_windows(tokenizer, manifest["corpus"], manifest["context_length"], manifest["text_field"])
        windows = list(islice(stream, first, first + n_windows))
    if not windows:
        raise ValueError(f"the corpus {manifest['corpus']} has no windows beyond those the SAE was trained on")
    return torch.stack(windows)


def lm_metrics(sae: SparseAutoencoder, cache, eval_tokens: int, model: str | None = None, batch_size: int = 8,
               progress: bool = True) -> dict:
    """Loss recovered and KL of the SAE spliced into the cache's model at the cache's hook, the SAE
    in eval mode (:meth:`~switchsae.saes.base.SparseAutoencoder.inference`).

    ``model`` defaults to the one the SAE was trained on; a cache built from another model or
    hook is refused, naming what differs.
    """
    from switchsae.lm_eval import loss_recovered
    from switchsae.sources.cache import check_compatible
    from switchsae.sources.models import load_model
    from switchsae.sources.shards import DTYPES

    manifest = cache.manifest
    model_name = model or sae.cfg.model_name or manifest["model"]
    hook_name = sae.cfg.hook_name or manifest["hook"]
    check_compatible(manifest, model_name, hook_name)
    lm, tokenizer = load_model(model_name, DTYPES[manifest["model_dtype"]][0])
    windows = held_out_windows(cache, tokenizer, eval_tokens)
    with sae.inference():
        return loss_recovered(lm, hook_name, sae.reconstruct, windows, batch_size, manifest["drop_first"], progress)


def evaluate_run(
    run_dir: str | Path, acts: str | Path | ActivationSource, *, loss_recovered: bool = False,
    eval_tokens: int = 32_768, model: str | None = None, batch_size: int = 4096, progress: bool = True,
    save_as: str = "metrics.json",
) -> dict:
    """Metrics of the SAE in ``run_dir`` on held-out activations (and inside the LM), saved to
    ``run_dir/save_as``."""
    sae = load_sae(run_dir)
    source = open_activations(acts) if isinstance(acts, (str, Path)) else acts
    if source.d_model != sae.cfg.d_model:
        raise ValueError(f"activations have d_model={source.d_model} but the SAE expects {sae.cfg.d_model}")
    batches = source.eval_batches(batch_size, token_ids=True) if sae.needs_token_ids else source.eval_batches(batch_size)
    metrics = evaluate(sae, batches, progress=progress)
    if loss_recovered:
        if not hasattr(source, "manifest"):
            raise ValueError("loss recovered needs an activation cache folder (it names the model, hook and corpus)")
        metrics.update(lm_metrics(sae, source, eval_tokens, model, progress=progress))
    write_json_atomic(Path(run_dir) / save_as, metrics)
    return metrics


@dataclass(frozen=True)
class DemoConfig:
    """The demo: cache SmolLM2 activations, train a Switch SAE and a FLOP-matched TopK, compare (on
    held-out rows and, given ``other_corpus``, on text of another domain), and write the Switch
    SAE's feature pages."""

    out: Path = Path("runs/demo")
    model: str = "smollm2-135m"
    hook: str = "blocks.10.hook_resid_post"
    corpus: str = "wiki-vital"
    model_dtype: str = "bf16"  # the LM runs in bf16 (faster on CPU: benchmarks/activations.py); cached in bf16
    tokens: int = 1_000_000
    width: int = 4096          # M0: the TopK's width and each Switch expert's width
    experts: int = 4           # Switch has experts x width latents, at the TopK's FLOPs
    k: int = 32
    steps: int = 400
    batch_size: int = 4096
    lr: float = 3.2e-3         # 8x the lr law at width 4096 (TopK, and each Switch expert): near the best lr of
                               # both at 240-720 steps (docs/results/recipe, section 5)
    eval_tokens: int = 16_384
    other_corpus: str | None = None  # text of another domain, every row of its cache held out
    other_tokens: int = 65_536


DEMO_COLUMNS = ["run", "arch", "width", "experts", "fvu", "mse", "l0", "dead_frac", "loss_recovered", "kl_sae",
                "flops_per_token", "train_s", "train_tok_per_s"]
#: the metrics the demo compares its two SAEs on, and whether a higher value is the better one
HIGHER_IS_BETTER = {"fvu": False, "dead_frac": False, "loss_recovered": True, "kl_sae": False}
#: the scores on the other domain's cache, as ``other_<metric>`` columns
OTHER_METRICS = list(HIGHER_IS_BETTER)


def comparison(rows: list[dict], prefix: str = "") -> str:
    """Metric by metric, whether the demo's Switch SAE scored better or worse than its TopK (columns
    ``prefix + metric`` of the rows, one training seed each), judged at the 4 decimals printed."""
    switch, topk = (next(row for row in rows if row["run"] == name) for name in ("switch", "topk"))
    verdicts = []
    for metric, higher in HIGHER_IS_BETTER.items():
        ours, theirs = round(switch[prefix + metric], 4), round(topk[prefix + metric], 4)
        word = "level" if ours == theirs else "better" if (ours > theirs) == higher else "worse"
        verdicts.append(f"{metric} {ours:.4f} against {theirs:.4f} ({word})")
    return "Switch against TopK (one seed each): " + ", ".join(verdicts)


def run_demo(cfg: DemoConfig = DemoConfig(), progress: bool = True) -> list[dict]:
    """Run the whole pipeline; every stage resumes from what is already in ``cfg.out``."""
    from switchsae.analysis.tables import markdown_table
    from switchsae.checkpoint import CHECKPOINT_FILE
    from switchsae.config import SAEConfig, TrainConfig
    from switchsae.sources.cache import ActivationCache, build_cache
    from switchsae.train import train

    cache_dir = build_cache(cfg.model, cfg.hook, cfg.corpus, cfg.tokens, cfg.out / "cache",
                            model_dtype=cfg.model_dtype, progress=progress)
    cache = ActivationCache(cache_dir)
    other = None
    if cfg.other_corpus is not None:  # scored only: every row held out
        other = ActivationCache(build_cache(cfg.model, cfg.hook, cfg.other_corpus, cfg.other_tokens,
                                            cfg.out / "cache_other", model_dtype=cfg.model_dtype, progress=progress),
                                eval_fraction=1.0, max_eval_rows=cfg.other_tokens)
    runs = {
        "topk": SAEConfig(arch="topk", d_model=cache.d_model, width=cfg.width, k=cfg.k),
        "switch": SAEConfig(arch="switch", d_model=cache.d_model, width=cfg.width * cfg.experts, k=cfg.k,
                            n_experts=cfg.experts),
    }
    train_cfg = TrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, normalize=True, checkpoint_every=100)
    rows = []
    for name, sae_cfg in runs.items():
        run_dir = cfg.out / name
        sae_cfg = sae_cfg.replace(model_name=cfg.model, hook_name=cfg.hook)
        resume = (run_dir / CHECKPOINT_FILE).exists()
        train(sae_cfg, cache, train_cfg, run_dir=run_dir, resume=resume, progress=progress)
        metrics = evaluate_run(run_dir, cache, loss_recovered=True, eval_tokens=cfg.eval_tokens, progress=progress)
        if other is not None:
            scores = evaluate_run(run_dir, other, loss_recovered=True, eval_tokens=cfg.eval_tokens,
                                  progress=progress, save_as="metrics_other.json")
            metrics.update({f"other_{key}": scores[key] for key in OTHER_METRICS})
        elapsed = _train_seconds(run_dir)
        rows.append({"run": name, "arch": sae_cfg.arch, "width": sae_cfg.width, "experts": sae_cfg.n_experts,
                     **metrics, "train_s": elapsed, "train_tok_per_s": cfg.steps * cfg.batch_size / elapsed})
    table = markdown_table(rows, DEMO_COLUMNS) + f"\n\n{comparison(rows)}"
    if other is not None:
        table += (f"\n\nOn {cfg.other_corpus} (another domain, {other.n_tokens - other.n_train:,} rows):\n\n"
                  + markdown_table(rows, ["run", *(f"other_{key}" for key in OTHER_METRICS)])
                  + f"\n\n{comparison(rows, 'other_')}")
    (cfg.out / "report.md").write_text(f"# switchsae demo\n\n{cfg}\n\n{table}\n")
    print(table)
    print(f"feature pages of the Switch SAE: {write_demo_pages(cfg, cache_dir, progress)}")
    return rows


def write_demo_pages(cfg: DemoConfig, cache_dir: Path, progress: bool = True) -> str:
    """The feature pages of the demo's Switch SAE in ``cfg.out/pages`` (kept if already written);
    returns how to open them."""
    from switchsae.apps.inspect import inspect_run
    from switchsae.apps.pages import how_to_open, is_pages

    pages_dir = cfg.out / "pages"
    if not is_pages(pages_dir):
        inspect_run(cfg.out / "switch", cache_dir, pages_dir, progress=progress)
    return how_to_open(pages_dir)


def _train_seconds(run_dir: Path) -> float:
    log = (run_dir / "log.jsonl").read_text().splitlines()
    return json.loads(log[-1])["elapsed_s"]
