"""Feature inspection: one streaming pass of a trained SAE over an activation cache, then the
feature pages (``switchsae inspect RUN --acts CACHE --out DIR``).

Cost: the pass encodes every row read exactly once, in batches of whole token windows, and keeps
only bounded per-feature summaries (:mod:`switchsae.apps.collect`); examples' contexts come from
the batch that holds them, so nothing is re-encoded. After the pass, from the weights alone:
boosted/suppressed tokens (``F·d·vocab`` multiply-adds) and nearest decoder rows in other experts
(``F·d·M``, the only term quadratic in the width: skip it with ``neighbours=0``, or inspect a
subset of features, at a million latents). Nothing ``[tokens, M]`` is ever built.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from switchsae.apps import pages
from switchsae.apps.collect import FeatureCollector
from switchsae.apps.config import InspectConfig
from switchsae.apps.directions import logit_effects, nearest_rows
from switchsae.apps.records import ContextReader, feature_records
from switchsae.saes import SAEOutput, SparseAutoencoder
from switchsae.saes.io import load_sae
from switchsae.sources.cache import ActivationCache, check_compatible
from switchsae.sources.models import load_model
from switchsae.sources.shards import rows_per_window


def block_probs(out: SAEOutput, n_blocks: int) -> Tensor | None:
    """``[T, blocks]``: each expert block's router probability on each token (a shared expert's
    block: 1, its gate), None for an SAE without a learned router (no experts, hash routing).
    The one place inspection reads routing information (the SAE's :class:`Assignment`)."""
    assignment = out.extras.get("assignment")
    if assignment is None or assignment.probs is None:
        return None
    probs = assignment.probs
    return torch.cat([probs, probs.new_ones(probs.shape[0], n_blocks - probs.shape[1])], 1)


def parse_features(text: str) -> list[int]:
    """Latent ids from a list of ids and inclusive ranges, e.g. ``"0-99,512"``."""
    ids: list[int] = []
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            lo, _, hi = part.partition("-")
            ids.extend(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise ValueError(f"Cannot read the feature list '{text}': expected ids and ranges such as 0-99,512.") from None
    return ids


def select_features(width: int, n_experts: int, features: list[int] | None = None,
                    expert: int | None = None) -> Tensor:
    """The latent ids to inspect, ascending: ``features`` (default all), restricted to ``expert``
    (``n_experts`` counts a shared expert's block too)."""
    selected = torch.arange(width) if features is None else torch.tensor(sorted(set(features)), dtype=torch.long)
    if len(selected) and not (0 <= int(selected[0]) and int(selected[-1]) < width):
        bad = next(f for f in selected.tolist() if not 0 <= f < width)
        raise ValueError(f"Feature {bad} is out of range: the SAE has {width} latents (0..{width - 1}).")
    if expert is not None:
        if n_experts < 2:
            raise ValueError("--expert applies to Switch SAEs only; this SAE has no experts.")
        if not 0 <= expert < n_experts:
            raise ValueError(f"Expert {expert} is out of range: the SAE has {n_experts} experts (0..{n_experts - 1}).")
        m = width // n_experts
        selected = selected[(selected >= expert * m) & (selected < (expert + 1) * m)]
    if len(selected) == 0:
        raise ValueError("No features selected: the feature list and the expert have no latent in common.")
    return selected


def open_inputs(run_dir: str | Path, cache_dir: str | Path) -> tuple[SparseAutoencoder, ActivationCache]:
    """The SAE and cache, checked to belong together and to hold what inspection needs."""
    sae = load_sae(run_dir)
    cache = ActivationCache(cache_dir)
    if cache.d_model != sae.cfg.d_model:
        raise ValueError(f"The cache in {cache_dir} holds d_model={cache.d_model} activations; the SAE in "
                         f"{run_dir} expects {sae.cfg.d_model}.")
    check_compatible(cache.manifest, sae.cfg.model_name or cache.manifest["model"],
                     sae.cfg.hook_name or cache.manifest["hook"])
    if not cache.has_token_ids:
        raise ValueError(f"The activation cache in {cache_dir} stores no token ids (it was built before they "
                         f"were stored), so examples cannot be shown as text; rebuild it with `switchsae cache`.")
    return sae, cache


@torch.no_grad()
def collect(sae: SparseAutoencoder, cache: ActivationCache, features: Tensor, cfg: InspectConfig,
            progress: bool = True) -> FeatureCollector:
    """The streaming pass: every row read encoded once, batch by batch of whole windows."""
    per_window = rows_per_window(cache.manifest)
    batch = max(1, cfg.batch_size // per_window) * per_window
    n_rows = cache.n_tokens if cfg.tokens == 0 else min(cache.n_tokens, -(-cfg.tokens // per_window) * per_window)
    collector = FeatureCollector(features, sae.cfg.width, sae.cfg.expert_width, per_window, top=cfg.top,
                                 intervals=cfg.intervals, per_interval=cfg.per_interval, bins=cfg.bins,
                                 before=cfg.before, after=cfg.after, seed=cfg.seed)
    with sae.inference():
        for start in tqdm(range(0, n_rows, batch), desc="inspect", unit="batch", disable=not progress):
            stop = min(start + batch, n_rows)
            ids = cache.token_ids(np.arange(start, stop)) if sae.needs_token_ids else None  # hash routing
            out = sae(cache.read(start, stop), token_ids=ids)
            collector.add(start, out.latents, block_probs(out, sae.cfg.n_blocks))
    return collector


def inspect_run(run_dir: str | Path, cache_dir: str | Path, out: str | Path, cfg: InspectConfig = InspectConfig(),
                features: list[int] | None = None, expert: int | None = None, progress: bool = True) -> Path:
    """Inspect the SAE in ``run_dir`` on the cache in ``cache_dir`` and write its feature pages to ``out``."""
    sae, cache = open_inputs(run_dir, cache_dir)
    selected = select_features(sae.cfg.width, sae.cfg.n_blocks, features, expert)
    manifest = cache.manifest
    timings = {}
    start = time.perf_counter()
    collector = collect(sae, cache, selected, cfg, progress)
    timings["pass_s"] = time.perf_counter() - start
    start = time.perf_counter()
    model, tokenizer = load_model(manifest["model"])
    directions = sae.W_dec.detach()[selected]
    boost, suppress = logit_effects(directions, model, cfg.logit_tokens)
    group_width = sae.cfg.expert_width if sae.cfg.n_blocks > 1 else 1
    near = nearest_rows(sae.W_dec, selected, group_width, cfg.neighbours) if cfg.neighbours else None
    timings["directions_s"] = time.perf_counter() - start
    contexts = ContextReader(cache.windows(), rows_per_window(manifest), manifest["drop_first"], cfg.before, cfg.after)
    records = feature_records(collector, contexts, sae.cfg.n_blocks, boost, suppress, near)
    meta = {"run": str(run_dir), "cache": str(cache_dir), "model": manifest["model"], "hook": manifest["hook"],
            "corpus": manifest["corpus"], "context_length": manifest["context_length"],
            "drop_first": manifest["drop_first"],
            "arch": sae.cfg.arch, "width": sae.cfg.width, "experts": sae.cfg.n_blocks, "k": sae.cfg.k,
            "shared_expert": sae.cfg.routing.shared_expert,
            "rows": collector.rows, "config": asdict(cfg),
            "timings": {name: round(seconds, 3) for name, seconds in timings.items()}}
    return pages.write_site(out, meta, records, lambda ids: tokenizer.batch_decode([[t] for t in ids]))
