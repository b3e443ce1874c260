"""Feature pages (``switchsae inspect``) as Neuronpedia / SAEDashboard batch JSON
(``switchsae export PAGES --format neuronpedia --out DIR``).

SAEDashboard's Neuronpedia runner (sae-dashboard 0.8.0, ``sae_dashboard/neuronpedia/``) writes a
folder of ``batch-N.json`` files, each one ``NeuronpediaDashboardBatch.to_dict()``, and a
``skipped_indexes.json`` naming the features it left out as dead::

    batch      = {model_id, layer, sae_set, sae_id_suffix, features: [feature]}
    feature    = {feature_index, neuron_alignment_{indices,values,l1},
                  correlated_neurons_{indices,l1,pearson}, correlated_features_{indices,l1,pearson},
                  neg_str, neg_values, pos_str, pos_values, frac_nonzero,
                  freq_hist_data_bar_values, freq_hist_data_bar_heights,
                  logits_hist_data_bar_heights, logits_hist_data_bar_values,
                  n_prompts_total, n_tokens_in_prompt, dataset, decoder_weights_dist,
                  activations: [activation], vector}
    activation = {bin_min, bin_max, bin_contains, tokens, values, qualifying_token_index}

What each field is filled from (a feature record, :mod:`switchsae.apps.records`):

    pos_str, pos_values / neg_str, neg_values   boost / suppress: token text, Δlogit
    frac_nonzero                                density: firings per token read
    freq_hist_data_bar_values, _heights         hist: bin centres (b + ½)·edge/bins, counts
    activations                                 the top examples as SAEDashboard marks its top group
                                                (bin_min = −1, bin_max = the feature's max, bin_contains
                                                = −1), then one group per sampled interval, highest
                                                first: bin_min, bin_max = lo, hi and bin_contains = the
                                                fraction of the tokens read whose z lies in [lo, hi)
                                                (SAEDashboard's lowest interval also counts z = 0);
                                                tokens: each context token's text, values: z on each
                                                (0 where no row is cached), qualifying_token_index:
                                                the example's token
    n_prompts_total, n_tokens_in_prompt         token windows read, tokens per window
    dataset                                     the cache's corpus
    model_id, layer                             the cache's model and its hook's layer

Inspection computes no neuron alignment, activation correlations, logit histogram,
attention-head weights or vector: those keep SAEDashboard's defaults (empty lists). Features that
never fired go to ``skipped_indexes.json``, its ``log_sparsity`` the log10 density they lie below
(one firing in the tokens read). Numbers are rounded to 3 decimals, as SAEDashboard's
converter rounds them (``bin_contains`` to 5, as its ``{:.3%}`` title keeps it).
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path

from switchsae.apps import pages
from switchsae.apps.records import AT, TOKENS, VALUE, example_acts
from switchsae.saes.io import write_json_atomic

#: features per batch file (SAEDashboard's n_features_at_a_time default)
BATCH = 128
SKIPPED = "skipped_indexes.json"
#: the fields SAEDashboard fills and inspection does not compute: their defaults
EMPTY_FIELDS = ("neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
                "correlated_neurons_indices", "correlated_neurons_l1", "correlated_neurons_pearson",
                "correlated_features_indices", "correlated_features_l1", "correlated_features_pearson",
                "logits_hist_data_bar_heights", "logits_hist_data_bar_values", "decoder_weights_dist", "vector")


def r3(x: float) -> float:
    """``x`` rounded to 3 decimals (SAEDashboard's ``round_list``)."""
    return round(float(x), 3)


def hook_layer(hook: str) -> int:
    """The layer of a hook name such as ``blocks.10.hook_resid_post`` (also ``layers.10...``)."""
    found = re.search(r"(?:^|\.)(?:blocks|layers|layer|h)\.(\d+)(?:\.|$)", hook)
    if found is None:
        raise ValueError(f"Cannot read a layer from the hook name {hook!r}; pass --layer.")
    return int(found.group(1))


class PagesRun:
    """What the batch files need from a pages folder's meta data, checked once."""

    def __init__(self, meta: dict, vocab: dict[str, str]):
        missing = [key for key in ("corpus", "context_length", "drop_first") if key not in meta]
        if missing:
            raise ValueError(f"These feature pages were written before they recorded {', '.join(missing)}; "
                             f"re-run `switchsae inspect` to export them.")
        self.rows, self.bins, self.vocab = meta["rows"], meta["config"]["bins"], vocab
        self.n_tokens_in_prompt = meta["context_length"]
        self.n_prompts_total = math.ceil(meta["rows"] / (meta["context_length"] - meta["drop_first"]))
        self.dataset = meta["corpus"]

    def text(self, token: int) -> str:
        return self.vocab[str(token)]

    def activation(self, example: list, bin_min: float, bin_max: float, bin_contains: float) -> dict:
        """One example as a NeuronpediaDashboardActivation dict."""
        values = [0.0 if z is None else r3(z) for z in example_acts(example)]
        return {"bin_min": bin_min, "bin_max": bin_max, "bin_contains": bin_contains,
                "tokens": [self.text(t) for t in example[TOKENS]], "values": values,
                "qualifying_token_index": example[AT]}

    def interval_share(self, record: dict, lo: float, hi: float) -> float:
        """Fraction of the tokens read whose z lies in ``[lo, hi)``, from the histogram's bins (the
        intervals are unions of whole bins: InspectConfig asks intervals to divide bins)."""
        width = record["hist"]["edge"] / self.bins
        first, stop = round(lo / width), round(hi / width)
        return sum(record["hist"]["counts"][first:stop]) / max(self.rows, 1)

    def feature(self, record: dict) -> dict:
        """One record as a NeuronpediaDashboardFeature dict."""
        edge, counts = record["hist"]["edge"], record["hist"]["counts"]
        activations = [self.activation(e, -1, r3(record["max"]), -1) for e in record["top"]]
        for group in reversed(record["samples"]):
            share = round(self.interval_share(record, group["lo"], group["hi"]), 5)  # SAEDashboard: {:.3%}
            activations += [self.activation(e, r3(group["lo"]), r3(group["hi"]), share)
                            for e in sorted(group["examples"], key=lambda e: -e[VALUE])]
        feature = {"feature_index": record["id"],
                   "neg_str": [self.text(t) for t, _ in record["suppress"]],
                   "neg_values": [r3(v) for _, v in record["suppress"]],
                   "pos_str": [self.text(t) for t, _ in record["boost"]],
                   "pos_values": [r3(v) for _, v in record["boost"]],
                   "frac_nonzero": record["density"],
                   "freq_hist_data_bar_values": [r3((b + 0.5) * edge / self.bins) for b in range(len(counts))],
                   "freq_hist_data_bar_heights": counts,
                   "n_prompts_total": self.n_prompts_total, "n_tokens_in_prompt": self.n_tokens_in_prompt,
                   "dataset": self.dataset, "activations": activations}
        return {**feature, **{name: [] for name in EMPTY_FIELDS}}


def read_records(folder: Path) -> Iterator[dict]:
    """The records of a pages folder, in id order, one chunk file at a time."""
    meta = pages.read_data(folder, pages.META)
    for chunk in range(math.ceil(meta["features"] / meta["chunk"])):
        yield from pages.read_data(folder, pages.chunk_name(chunk))


def export_neuronpedia(pages_dir: str | Path, out: str | Path, sae_set: str | None = None,
                       model_id: str | None = None, layer: int | None = None, batch: int = BATCH,
                       force: bool = False) -> Path:
    """Write the features of the pages in ``pages_dir`` as Neuronpedia batch files into ``out``:
    ``batch-0.json, batch-1.json, …`` (``batch`` features each) and ``skipped_indexes.json``.
    Defaults: ``model_id`` the cache's model, ``layer`` read from its hook, ``sae_set``
    ``switchsae-ARCH-WIDTH``."""
    pages_dir, out = Path(pages_dir), Path(out)
    if not pages.is_pages(pages_dir):
        raise ValueError(f"{pages_dir} holds no feature pages; write them with `switchsae inspect`.")
    meta = pages.read_data(pages_dir, pages.META)
    run = PagesRun(meta, pages.read_data(pages_dir, pages.VOCAB))
    header = {"model_id": model_id or meta["model"], "layer": hook_layer(meta["hook"]) if layer is None else layer,
              "sae_set": sae_set or f"switchsae-{meta['arch']}-{meta['width']}", "sae_id_suffix": None}
    _claim(out, force)
    features: list[dict] = []
    skipped: list[int] = []
    n_batches = 0
    for record in read_records(pages_dir):
        if record["count"] == 0:
            skipped.append(record["id"])
            continue
        features.append(run.feature(record))
        if len(features) == batch:
            _write_batch(out, n_batches, header, features)
            n_batches, features = n_batches + 1, []
    if features:
        _write_batch(out, n_batches, header, features)
    write_json_atomic(out / SKIPPED, {"model_id": header["model_id"], "layer": str(header["layer"]),
                                      "sae_set": header["sae_set"], "log_sparsity": math.log10(1 / max(run.rows, 1)),
                                      "skipped_indexes": skipped})
    return out


def _write_batch(out: Path, number: int, header: dict, features: list[dict]) -> None:
    (out / f"batch-{number}.json").write_text(json.dumps({**header, "features": features}), encoding="utf-8")


def _claim(out: Path, force: bool) -> None:
    """``out`` created and holding no batch files (earlier ones removed with ``force``)."""
    taken = sorted(out.glob("batch-*.json")) + ([out / SKIPPED] if (out / SKIPPED).exists() else [])
    if taken and not force:
        raise FileExistsError(f"{out} already holds Neuronpedia batch files; pass --force to overwrite them")
    for path in taken:
        path.unlink()
    out.mkdir(parents=True, exist_ok=True)
