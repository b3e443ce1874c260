"""What automated interpretation shows the LLM: a stratified sample of live latents and, for each,
examples split between the explainer and the scorer, plus contexts where it does not fire.

- **Firing counts** of every latent over the rows read (one encode pass; or the ``density`` column of
  feature pages from ``switchsae inspect``). Scorable: fired at least ``explain_top + scored`` times,
  enough examples to explain and to score.
- **Stratified sample** of ``n`` scorable latents: sorted by (expert, count, id), cut into ``n`` strata
  of equal size ``L/n`` (``L`` scorable latents), one latent drawn uniformly from each; so every
  expert and every density range of it is represented in proportion to its number of latents.
- **Activating examples** are the inspection stage's feature data (:mod:`switchsae.apps.collect`: the
  top activations and uniform samples from 8 activation intervals, in context), read from pages or
  collected by the same streaming pass. The explainer gets the ``explain_top`` strongest and one
  random sample of each interval; the rest are held out for scoring (interval samples first, so the
  scored examples span the activation range).
- **Non-activating contexts**: rows of ``negative_windows`` random windows, encoded once, whose whole
  shown context (``before`` tokens before to ``after`` after) has ``z_j = 0``.

Examples are JSON-ready dicts ``{row, value, at, tokens: [text], acts: [z | None]}`` (None where no
row is cached); special tokens are shown as ``[name]`` so no chat template reads them as its own.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from switchsae.apps import pages
from switchsae.apps.autointerp.config import AutointerpConfig
from switchsae.apps.collect import firing_entries
from switchsae.apps.config import InspectConfig
from switchsae.apps.inspect import collect
from switchsae.apps.records import (
    AT,
    ROW,
    TOKENS,
    VALUE,
    ContextReader,
    example_acts,
    feature_records,
)
from switchsae.saes import Latents, SparseAutoencoder
from switchsae.sources.cache import ActivationCache
from switchsae.sources.shards import rows_per_window

TokenText = Callable[[list[int]], list[str]]


def rows_read(cache: ActivationCache, tokens: int) -> int:
    """Rows ``[0, n)`` a pass reads: ``tokens`` rounded up to whole windows (0: all), as inspection."""
    per_window = rows_per_window(cache.manifest)
    return cache.n_tokens if tokens == 0 else min(cache.n_tokens, -(-tokens // per_window) * per_window)


def _latents(sae: SparseAutoencoder, x: Tensor, rows: np.ndarray, cache: ActivationCache) -> Latents:
    """The codes of ``x`` (cache ``rows``): the encoder alone, unless the SAE routes by token id."""
    if sae.needs_token_ids:  # hash routing: only forward takes the ids
        return sae(x, token_ids=cache.token_ids(rows)).latents
    return sae.encode(x)


@torch.no_grad()
def firing_counts(sae: SparseAutoencoder, cache: ActivationCache, n_rows: int, batch_size: int,
                  progress: bool = True) -> Tensor:
    """How often each latent fires on rows ``[0, n_rows)``, ``[M]`` int64."""
    counts = torch.zeros(sae.cfg.width, dtype=torch.long)
    for start in tqdm(range(0, n_rows, batch_size), desc="densities", unit="batch", disable=not progress):
        stop = min(start + batch_size, n_rows)
        counts += _latents(sae, cache.read(start, stop), np.arange(start, stop), cache).fired(sae.cfg.width)
    return counts


def stratified_sample(counts: Tensor, group_width: int, n: int, seed: int, min_count: int = 1) -> list[int]:
    """``n`` latents among those that fired at least ``min_count`` times, one from each of ``n`` equal
    strata of them sorted by (group ``id // group_width``, count, id); ascending ids."""
    live = (counts >= min_count).nonzero().squeeze(1)
    if n > len(live):
        raise ValueError(f"--features {n} asks for more latents than can be scored: {len(live)} of the SAE's "
                         f"{len(counts)} latents fire at least {min_count} times in the rows read "
                         f"(--explain-top + --scored).")
    order = sorted(live.tolist(), key=lambda j: (j // group_width, int(counts[j]), j))
    rng = np.random.default_rng(seed)
    picks = [int(np.floor((i + rng.random()) * len(order) / n)) for i in range(n)]
    return sorted(order[min(p, len(order) - 1)] for p in picks)


def token_texts(tokenizer) -> TokenText:
    """Token ids → the text each shows (special tokens as ``[name]``), memoised."""
    special = set(tokenizer.all_special_ids)
    memo: dict[int, str] = {}

    def text(ids: list[int]) -> list[str]:
        missing = [t for t in dict.fromkeys(ids) if t not in memo]
        for t, s in zip(missing, tokenizer.batch_decode([[t] for t in missing])):
            memo[t] = f"[{s.strip('<|>')}]" if t in special else s
        return [memo[t] for t in ids]
    return text


def as_example(example: list, text: TokenText) -> dict:
    """A record's example (:mod:`switchsae.apps.records`) as an autointerp example."""
    return {"row": example[ROW], "value": example[VALUE], "at": example[AT], "tokens": text(example[TOKENS]),
            "acts": example_acts(example)}


def split_examples(record: dict, explain_top: int, rng: np.random.Generator) -> tuple[list[list], list[list]]:
    """(explainer's, held-out) record examples of a feature record, as the module doc says."""
    explain, held_samples = list(record["top"][:explain_top]), []
    for group in record["samples"]:
        examples = [group["examples"][i] for i in rng.permutation(len(group["examples"]))]
        explain.append(examples[0])
        held_samples.extend(examples[1:])
    held_samples = [held_samples[i] for i in rng.permutation(len(held_samples))]
    return explain, held_samples + list(record["top"][explain_top:])


def records_from_pages(folder: str, features: list[int]) -> list[dict]:
    """The records of ``features`` in the feature pages in ``folder`` (each data chunk read once)."""
    position = {j: i for i, j in enumerate(pages.read_data(folder, pages.INDEX)["id"])}
    missing = [j for j in features if j not in position]
    if missing:
        raise ValueError(f"Latent {missing[0]} is not in the feature pages in {folder}; inspect it or leave --inspect out.")
    chunks: dict[int, list] = {}
    for j in features:
        chunks.setdefault(position[j] // pages.CHUNK, pages.read_data(folder, pages.chunk_name(position[j] // pages.CHUNK)))
    return [chunks[position[j] // pages.CHUNK][position[j] % pages.CHUNK] for j in features]


def collect_records(sae: SparseAutoencoder, cache: ActivationCache, features: list[int], cfg: AutointerpConfig,
                    contexts: ContextReader, progress: bool = True) -> list[dict]:
    """The inspection stage's records of ``features`` by its own streaming pass (no logit effects or
    nearest rows: autointerp reads only the examples and statistics)."""
    ids = torch.tensor(features, dtype=torch.long)
    collector = collect(sae, cache, ids, InspectConfig(tokens=cfg.tokens, batch_size=cfg.batch_size, seed=cfg.seed),
                        progress)
    none = (torch.empty(len(ids), 0), torch.empty(len(ids), 0, dtype=torch.long))
    return list(feature_records(collector, contexts, sae.cfg.n_blocks, none, none, None))


@torch.no_grad()
def non_activating(sae: SparseAutoencoder, cache: ActivationCache, features: list[int], n_rows: int,
                   contexts: ContextReader, per_feature: int, n_windows: int, seed: int) -> dict[int, list[list]]:
    """Per feature, up to ``per_feature`` record examples (value 0) whose shown context has ``z_j = 0``,
    from ``n_windows`` random whole windows among rows ``[0, n_rows)``."""
    per_window = rows_per_window(cache.manifest)
    rng = np.random.default_rng([seed, 1])
    total = n_rows // per_window
    windows = np.sort(rng.choice(total, size=min(n_windows, total), replace=False))
    rows = torch.from_numpy(windows[:, None] * per_window + np.arange(per_window)).flatten()
    x = torch.cat([cache.read(w * per_window, (w + 1) * per_window) for w in windows.tolist()])
    lookup = torch.full((sae.cfg.width,), -1, dtype=torch.long)
    lookup[torch.tensor(features)] = torch.arange(len(features))
    row, latent, _ = firing_entries(_latents(sae, x, rows.numpy(), cache))
    feature = lookup[latent]
    fired = torch.zeros(len(rows), len(features), dtype=torch.int32)
    fired[row[feature >= 0], feature[feature >= 0]] = 1
    fired = fired.view(len(windows), per_window, len(features))
    cumulative = torch.nn.functional.pad(fired.cumsum(1), (0, 0, 1, 0))  # [W, R + 1, F]
    q = torch.arange(per_window)
    lo, hi = (q - contexts.before).clamp(min=0), (q + contexts.after + 1).clamp(max=per_window)
    quiet = (cumulative[:, hi] - cumulative[:, lo]) == 0  # [W, R, F]: no firing in the shown context
    zeros = np.zeros(contexts.before + contexts.after + 1)
    found: dict[int, list[list]] = {}
    for f, feature_id in enumerate(features):
        where = quiet[:, :, f].flatten().nonzero().squeeze(1).numpy()
        chosen = rng.choice(where, size=min(per_feature, len(where)), replace=False) if len(where) else where
        found[feature_id] = [contexts.example(int(windows[c // per_window]) * per_window + int(c % per_window), 0.0, zeros)
                          for c in sorted(chosen)]
    return found


def feature_entry(record: dict, negatives: list[list], cfg: AutointerpConfig, text: TokenText) -> dict:
    """Everything the LLM is shown of one feature: its statistics, the explainer's examples, the
    held-out activating examples and the non-activating contexts."""
    rng = np.random.default_rng([cfg.seed, record["id"]])
    explain, held_out = split_examples(record, cfg.explain_top, rng)
    entry = {name: record[name] for name in ("id", "expert", "count", "density", "max") if name in record}
    return {**entry, "explain": [as_example(e, text) for e in explain],
            "positives": [as_example(e, text) for e in held_out],
            "negatives": [as_example(e, text) for e in negatives]}

