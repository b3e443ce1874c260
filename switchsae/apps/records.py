"""JSON-ready feature records from what :class:`~switchsae.apps.collect.FeatureCollector` gathered.

A record (numbers rounded to 4 significant digits)::

    id, count, density, mean, max          the statistics of collect.py
    expert, router: {mean, max}            Switch SAEs only (router: if the feature fired and the
                                           router is learned)
    hist: {edge, counts}                   bin b covers [b, b+1)·edge/bins; trailing empty bins cut
    top: [example]                         strongest first
    samples: [{lo, hi, examples}]          one group per non-empty interval [lo, hi) of z
    boost, suppress: [[token id, Δlogit]]  see directions.logit_effects
    near: [[latent id, cos]]               see directions.nearest_rows
    example = [row, value, at, tokens, others]   (a list: the pages hold ~26 per feature)
        row: the cache row, value: its z, tokens: token ids of the context, at: the example's index
        in tokens, others: [[i, z_i]] for the other context tokens where z_i ≠ 0, z_i = null where
        no row is cached (the attention sink, the cache's end)
"""
from __future__ import annotations

from collections import Counter
from math import ldexp
from typing import Iterator

import numpy as np
from torch import Tensor

from switchsae.apps.collect import FeatureCollector


ROW, VALUE, AT, TOKENS, OTHERS = range(5)  # the fields of an example
RECORD_BLOCK = 4096


def rounded(x: float) -> float:
    """``x`` to 4 significant digits (compact JSON)."""
    return float(f"{x:.4g}")


class ContextReader:
    """Token ids around cached rows: row ``r`` is the token at position ``r % R + drop_first`` of
    window ``r // R`` (``R`` rows per window)."""

    def __init__(self, windows: np.ndarray, rows_per_window: int, drop_first: int, before: int, after: int):
        self.windows, self.rows_per_window, self.drop_first = windows, rows_per_window, drop_first
        self.before, self.after = before, after

    def example(self, row: int, value: float, context: np.ndarray) -> list:
        """The record of one example (see the module doc); ``context`` holds ``z`` at offsets
        ``-before..after`` of the row, NaN where no row is cached."""
        window, position = divmod(row, self.rows_per_window)
        position += self.drop_first
        first = position - self.before
        lo, hi = max(0, first), min(self.windows.shape[1], position + self.after + 1)
        at = position - lo
        others = [[i, None if z != z else float(f"{z:.3g}")]
                  for i, z in enumerate(context[lo - first:hi - first].tolist()) if i != at and z != 0]
        return [row, rounded(value), at, self.windows[window, lo:hi].tolist(), others]


class _Examples:
    """The examples a :class:`~switchsae.apps.streaming.BestPerSlot` table holds, read out slot by slot."""

    def __init__(self, scores: Tensor, payload: dict[str, Tensor], contexts: ContextReader):
        self.filled = (scores > float("-inf")).sum(1).tolist()
        self.values = (payload["value"] if "value" in payload else scores).tolist()
        self.rows = payload["row"].tolist()
        self.context = payload["context"].float().numpy()
        self.contexts = contexts

    def of(self, slot: int) -> list[list]:
        return [self.contexts.example(self.rows[slot][j], self.values[slot][j], self.context[slot, j])
                for j in range(self.filled[slot])]


def feature_records(collector: FeatureCollector, contexts: ContextReader, n_experts: int,
                    boost: tuple[Tensor, Tensor], suppress: tuple[Tensor, Tensor],
                    near: tuple[Tensor, Tensor] | None) -> Iterator[dict]:
    """One record per collected feature, in the collector's feature order (``RECORD_BLOCK``
    features' tensors at a time turned into Python objects, so a million features fit)."""
    directions = {"boost": boost, "suppress": suppress, **({"near": near} if near is not None else {})}
    for start in range(0, len(collector.features), RECORD_BLOCK):
        yield from _records(collector, contexts, n_experts, directions, slice(start, start + RECORD_BLOCK))


def _records(c: FeatureCollector, contexts: ContextReader, n_experts: int,
             directions: dict[str, tuple[Tensor, Tensor]], span: slice) -> list[dict]:
    """The records of the features ``span`` (positions in the collector)."""
    count, total, top_score = c.count[span].tolist(), c.total[span].tolist(), c.top.scores[span, 0].tolist()
    prob_total, prob_max = c.prob_total[span].tolist(), c.prob_max[span].tolist()
    hist_counts, exponents = c.hist.counts[span].tolist(), c.hist.exponent[span].tolist()
    top = _Examples(c.top.scores[span], {name: t[span] for name, t in c.top.payload.items()}, contexts)
    slots = slice(span.start * c.intervals, span.stop * c.intervals)
    samples = _Examples(c.samples.scores[slots], {name: t[slots] for name, t in c.samples.payload.items()}, contexts)
    pairs = {name: (ids[span].tolist(), values[span].tolist()) for name, (values, ids) in directions.items()}
    records = []
    for i, latent in enumerate(c.features[span].tolist()):
        n, edge = count[i], ldexp(1.0, exponents[i])
        record = {"id": latent, "count": n, "density": rounded(n / max(c.rows, 1)),
                  "mean": rounded(total[i] / n) if n else 0.0, "max": rounded(top_score[i]) if n else 0.0}
        if n_experts > 1:
            record["expert"] = latent // c.expert_width
            if n and c.routed:
                record["router"] = {"mean": rounded(prob_total[i] / n), "max": rounded(prob_max[i])}
        counts = hist_counts[i][:max((b + 1 for b, k in enumerate(hist_counts[i]) if k), default=0)]
        record["hist"] = {"edge": edge if n else 0.0, "counts": counts}
        record["top"] = top.of(i)
        record["samples"] = [{"lo": rounded(edge * part / c.intervals), "hi": rounded(edge * (part + 1) / c.intervals),
                              "examples": sorted(found, key=lambda e: -e[VALUE])}
                             for part in range(c.intervals) if (found := samples.of(i * c.intervals + part))]
        for name, (ids, values) in pairs.items():
            record[name] = [[j, rounded(v)] for j, v in zip(ids[i], values[i]) if v > float("-inf")]
        records.append(record)
    return records


def example_acts(example: list) -> list[float | None]:
    """``z`` of every context token of an example (None where no row is cached)."""
    acts: list[float | None] = [0.0] * len(example[TOKENS])
    acts[example[AT]] = example[VALUE]
    for i, z in example[OTHERS]:
        acts[i] = z
    return acts


def top_tokens(record: dict, n: int = 3) -> list[int]:
    """The ``n`` tokens the feature fires on most often among its top examples."""
    counts = Counter(example[TOKENS][example[AT]] for example in record["top"])
    return [token for token, _ in counts.most_common(n)]


def index_entry(record: dict) -> dict:
    """What the pages' index lists of a feature: id, expert (0 without experts), density, max
    activation, its top tokens and its 3 most boosted tokens."""
    return {"id": record["id"], "expert": record.get("expert", 0), "density": record["density"], "max": record["max"],
            "top": top_tokens(record), "boost": [token for token, _ in record["boost"][:3]]}


def used_tokens(record: dict) -> set[int]:
    """Every token id a record shows (contexts, boosted and suppressed tokens)."""
    ids = {token for token, _ in record["boost"] + record["suppress"]}
    for example in record["top"] + [e for group in record["samples"] for e in group["examples"]]:
        ids.update(example[TOKENS])
    return ids
