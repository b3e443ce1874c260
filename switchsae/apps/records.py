"""JSON-ready feature records from what :class:`~switchsae.apps.collect.FeatureCollector` gathered.

A record (numbers rounded to 4 significant digits)::

    id, count, density, mean, max          the statistics of collect.py
    expert, router: {mean, max}            Switch SAEs only (router only if the feature fired)
    hist: {edge, counts}                   bin b covers [b, b+1)·edge/bins; trailing empty bins cut
    top: [example]                         strongest first
    samples: [{lo, hi, examples}]          one group per non-empty interval [lo, hi) of z
    boost, suppress: [[token id, Δlogit]]  see directions.logit_effects
    near: [[latent id, cos]]               see directions.nearest_rows
    example = {row, value, tokens: [token ids], acts: [z or null], at: index of the example's token}
"""
from __future__ import annotations

from collections import Counter
from math import ldexp

import numpy as np
from torch import Tensor

from switchsae.apps.collect import FeatureCollector


def rounded(x: float) -> float:
    """``x`` to 4 significant digits (compact JSON)."""
    return float(f"{x:.4g}")


class ContextReader:
    """Token ids around cached rows: row ``r`` is the token at position ``r % R + drop_first`` of
    window ``r // R`` (``R`` rows per window)."""

    def __init__(self, windows: np.ndarray, rows_per_window: int, drop_first: int, before: int, after: int):
        self.windows, self.rows_per_window, self.drop_first = windows, rows_per_window, drop_first
        self.before, self.after = before, after

    def example(self, row: int, value: float, context: Tensor) -> dict:
        """The record of one example: its row, ``z``, the context's tokens and their ``z``."""
        window, position = divmod(row, self.rows_per_window)
        position += self.drop_first
        lo = max(0, position - self.before)
        hi = min(self.windows.shape[1], position + self.after + 1)
        acts = context[lo - (position - self.before):hi - (position - self.before)].float().tolist()
        return {"row": row, "value": rounded(value), "tokens": self.windows[window, lo:hi].tolist(),
                "acts": [None if a != a else rounded(a) for a in acts], "at": position - lo}


def feature_records(collector: FeatureCollector, contexts: ContextReader, n_experts: int,
                    boost: tuple[Tensor, Tensor], suppress: tuple[Tensor, Tensor],
                    near: tuple[Tensor, Tensor] | None) -> list[dict]:
    """One record per collected feature, in the collector's feature order."""
    c = collector
    records = []
    for i, latent in enumerate(c.features.tolist()):
        count = int(c.count[i])
        record = {"id": latent, "count": count, "density": rounded(count / max(c.rows, 1)),
                  "mean": rounded(c.total[i].item() / count) if count else 0.0,
                  "max": rounded(c.top.scores[i, 0].item()) if count else 0.0}
        if n_experts > 1:
            record["expert"] = latent // c.expert_width
            if count:
                record["router"] = {"mean": rounded(c.prob_total[i].item() / count), "max": rounded(c.prob_max[i].item())}
        record["hist"] = _histogram(c, i)
        record["top"] = _examples(contexts, c.top.scores[i], c.top.payload, i)
        record["samples"] = _sample_groups(c, contexts, i)
        record["boost"] = _pairs(boost[1][i], boost[0][i])
        record["suppress"] = _pairs(suppress[1][i], suppress[0][i])
        if near is not None:
            record["near"] = _pairs(near[1][i], near[0][i])
        records.append(record)
    return records


def _pairs(ids: Tensor, values: Tensor) -> list[list]:
    return [[int(j), rounded(v)] for j, v in zip(ids.tolist(), values.tolist()) if v > float("-inf")]


def _histogram(c: FeatureCollector, i: int) -> dict:
    counts = c.hist.counts[i].tolist()
    while counts and counts[-1] == 0:
        counts.pop()
    return {"edge": ldexp(1.0, int(c.hist.exponent[i])) if counts else 0.0, "counts": counts}


def _examples(contexts: ContextReader, scores: Tensor, payload: dict[str, Tensor], slot: int) -> list[dict]:
    values = payload["value"][slot] if "value" in payload else scores
    return [contexts.example(int(payload["row"][slot, j]), float(values[j]), payload["context"][slot, j])
            for j in range(len(scores)) if scores[j] > float("-inf")]


def _sample_groups(c: FeatureCollector, contexts: ContextReader, i: int) -> list[dict]:
    """The kept samples of feature ``i``, one group per interval that has any, lowest first."""
    edge = ldexp(1.0, int(c.hist.exponent[i]))
    groups = []
    for part in range(c.intervals):
        slot = i * c.intervals + part
        examples = _examples(contexts, c.samples.scores[slot], c.samples.payload, slot)
        if examples:
            examples.sort(key=lambda e: -e["value"])
            groups.append({"lo": rounded(edge * part / c.intervals), "hi": rounded(edge * (part + 1) / c.intervals),
                           "examples": examples})
    return groups


def top_tokens(record: dict, n: int = 3) -> list[int]:
    """The ``n`` tokens the feature fires on most often among its top examples."""
    counts = Counter(example["tokens"][example["at"]] for example in record["top"])
    return [token for token, _ in counts.most_common(n)]


def used_tokens(records: list[dict]) -> set[int]:
    """Every token id a record shows (contexts, boosted and suppressed tokens)."""
    ids: set[int] = set()
    for record in records:
        for example in record["top"] + [e for group in record["samples"] for e in group["examples"]]:
            ids.update(example["tokens"])
        ids.update(token for token, _ in record["boost"] + record["suppress"])
    return ids
