"""Sparse probing (SAEBench; Gurnee et al. 2023): how well a few SAE latents carry a document label.

For each balanced one-vs-rest task (:mod:`switchsae.evals.labelled`) and features ``f_d ∈ R^p``
of each document ``d`` (its mean-pooled SAE code, :mod:`switchsae.evals.documents`), the ``m``
features with the largest class mean difference on the training split,

    S_m = top-m of  |mean_{d ∈ train, y_d = 1} f_d − mean_{d ∈ train, y_d = 0} f_d|   (per feature)

feed a logistic probe (:func:`switchsae.evals.logistic.fit_logistic`) trained on the training split;
its score is the balanced accuracy on the held-out split. ``m`` runs over 1, 2, 5, 10, 20; ``m = all``
(``S = `` every feature) is the dense ceiling. Baselines: the same on the mean-pooled raw activations
(``p = d``). A seed draws the split and the negatives; each seed's score is the mean over the
classes' tasks, and tables show the mean over seeds with its 95% Student-t interval.

For a Switch SAE two more readings: where the selected latents live (the share of each class's
``S_m`` in each expert, against the uniform ``1/N``), and each expert alone (``S_m`` drawn from one
expert's latents only).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from switchsae.analysis.tables import markdown_table
from switchsae.config import opt
from switchsae.evals.cached import cached_documents
from switchsae.evals.documents import DocumentActivations, document_activations, mean_pool, pooled_codes
from switchsae.evals.labelled import TASKS, BinaryTask, binary_tasks, read_task, select_documents
from switchsae.evals.logistic import fit_logistic
from switchsae.evals.runs import check_width, expert_of_latents, load_runs, save_result
from switchsae.evals.stats import balanced_accuracy, mean_interval
from switchsae.sources.cache import ActivationCache, check_compatible
from switchsae.sources.hooks import HookPoint

RAW = "raw activations"


@dataclass(frozen=True)
class ProbingConfig:
    """What to probe and how (``switchsae probe`` flags)."""

    task: str = opt("wiki-topic", f"labelled text: {' or '.join(TASKS)}")
    data: str = opt("", "file/folder of the task's text (default: shared/data beside the checkout)")
    acts: str = opt("", "activation cache of the task's corpus (with token ids) to read documents from "
                        "instead of running the model (switchsae.evals.cached)")
    docs_per_class: int = opt(200, "documents drawn per class")
    max_classes: int = opt(12, "the classes with the most documents, at most this many")
    test_fraction: float = opt(0.2, "share of each class's documents held out")
    seeds: int = opt(3, "seeds 0..S-1, each a split and a draw of negatives")
    context_length: int = opt(128, "tokens per document, BOS included")
    chunk_chars: int = opt(600, "gutenberg-author: characters per book chunk")
    probe_c: float = opt(1.0, "inverse L2 strength C of the logistic probes (scikit-learn's default)")
    expert_m: int = opt(5, "Switch: m of the per-expert probes")
    batch_size: int = opt(16, "documents per forward pass")
    ms: tuple[int, ...] = field(default=(1, 2, 5, 10, 20))

    def __post_init__(self) -> None:
        if self.seeds < 1 or self.context_length < 2 or self.expert_m < 1 or self.probe_c <= 0:
            raise ValueError("seeds and expert_m must be positive, context_length at least 2 and C positive.")


def top_mean_difference(x: Tensor, y: Tensor, m: int) -> Tensor:
    """The ``m`` columns of ``x: [n, p]`` with the largest ``|mean(x[y]) − mean(x[~y])|``."""
    difference = (x[y].mean(0) - x[~y].mean(0)).abs()
    return difference.argsort(descending=True, stable=True)[:m]


def task_accuracy(features: Tensor, task: BinaryTask, columns: Tensor | None, C: float) -> float:
    """Balanced test accuracy of a probe on ``columns`` (all when None) of ``features: [D, p]``."""
    x = features if columns is None else features[:, columns]
    probe = fit_logistic(x[task.train], task.train_y, C=C)
    return balanced_accuracy(probe.predict(x[task.test]), task.test_y)


def probe_features(features: Tensor, tasks: list[BinaryTask], ms: tuple[int, ...], C: float,
                   candidates: Tensor | None = None) -> tuple[dict[str, list[float]], dict[int, list[int]]]:
    """Per setting (``m=1`` ... and ``all``) the accuracy of each task, and each task's selected
    columns at the largest ``m``; ``candidates`` restricts the selection (an expert's latents)."""
    scores: dict[str, list[float]] = {}
    selected: dict[int, list[int]] = {}
    pool = features if candidates is None else features[:, candidates]
    for m in ms:
        scores[f"m={m}"] = []
        for task in tasks:
            local = top_mean_difference(pool[task.train], task.train_y, m)
            columns = local if candidates is None else candidates[local]
            scores[f"m={m}"].append(task_accuracy(features, task, columns, C))
            if m == max(ms):
                selected[task.label] = columns.tolist()
    if candidates is None:
        scores["all"] = [task_accuracy(features, task, None, C) for task in tasks]
    return scores, selected


def expert_readings(features: Tensor, tasks_by_seed: list[list[BinaryTask]], experts: Tensor,
                    selected: list[dict[int, list[int]]], cfg: ProbingConfig, n_classes: int) -> dict:
    """The Switch readings of the module doc: ``share[c][e]`` of class ``c``'s selected latents in
    expert ``e`` (over seeds), and the accuracy of probes restricted to each expert."""
    n_experts = int(experts.max()) + 1
    share = torch.zeros(n_classes, n_experts)
    for chosen in selected:
        for label, columns in chosen.items():
            share[label] += torch.bincount(experts[columns], minlength=n_experts).float()
    share /= share.sum(1, keepdim=True)
    per_expert = []
    for e in range(n_experts):
        latents = (experts == e).nonzero().flatten()
        seeds = [probe_features(features, tasks, (cfg.expert_m,), cfg.probe_c, latents)[0][f"m={cfg.expert_m}"]
                 for tasks in tasks_by_seed]
        per_expert.append([sum(s) / len(s) for s in seeds])
    return {"selected_share": share.tolist(), "max_share_mean": float(share.max(1).values.mean()),
            "uniform_share": 1 / n_experts, f"accuracy_m={cfg.expert_m}_per_expert": per_expert}


def evaluate_features(features: Tensor, tasks_by_seed: list[list[BinaryTask]], cfg: ProbingConfig,
                      experts: Tensor | None = None, n_classes: int = 0) -> dict:
    """Scores of one feature set over all seeds: per setting the per-seed class means and the
    per-seed, per-class accuracies; for a Switch SAE also :func:`expert_readings`."""
    per_seed: dict[str, list[float]] = {}
    per_class: dict[str, list[list[float]]] = {}
    selected = []
    for tasks in tasks_by_seed:
        scores, chosen = probe_features(features, tasks, cfg.ms, cfg.probe_c)
        selected.append(chosen)
        for setting, values in scores.items():
            per_seed.setdefault(setting, []).append(sum(values) / len(values))
            per_class.setdefault(setting, []).append(values)
    result = {"accuracy": per_seed, "accuracy_per_class": per_class,
              f"selected_m={max(cfg.ms)}": selected}
    if experts is not None:
        result["experts"] = expert_readings(features, tasks_by_seed, experts, selected, cfg, n_classes)
    return result


def probing_documents(cfg: ProbingConfig, model_name: str, hook: HookPoint,
                      progress: bool = False) -> tuple[DocumentActivations, Tensor, list[str], float]:
    """The task's documents, their class ids and names, from ``cfg.acts`` (a cache of the task's
    corpus, which must come from ``model_name`` at ``hook``) or from a pass of the model over the
    task's text; and the seconds the model pass (or the cache read) took."""
    started = time.perf_counter()
    if cfg.acts:
        cache = ActivationCache(cfg.acts)
        check_compatible(cache.manifest, model_name, hook)
        acts, labels, classes = cached_documents(cache, cfg.task, cfg.docs_per_class, cfg.max_classes,
                                                 cfg.context_length, cfg.data or None)
        return acts, labels, classes, time.perf_counter() - started
    from switchsae.sources.models import load_model

    rows = read_task(cfg.task, cfg.data or None, cfg.chunk_chars)
    docs = select_documents(rows, cfg.docs_per_class, cfg.max_classes, source=cfg.data or cfg.task)
    lm, tokenizer = load_model(model_name)
    started = time.perf_counter()
    acts = document_activations(lm, tokenizer, hook, docs.texts, context_length=cfg.context_length,
                                batch_size=cfg.batch_size, progress=progress)
    return acts, docs.labels, docs.classes, time.perf_counter() - started


def run_probing(runs: list[str | Path], cfg: ProbingConfig, model: str | None = None, progress: bool = False,
                out: str | Path | None = None) -> dict:
    """Sparse probing of every run's SAE (all on one model and hook) and of the raw activations,
    on one pass of the model over the task's documents (or one read of a cache); timings included.
    With ``out``, the results so far are written there (JSON) after each SAE."""
    loaded, model_name, hook = load_runs(runs, model)
    acts, labels, classes, model_s = probing_documents(cfg, model_name, hook, progress)
    for run in loaded:
        check_width(acts.acts, hook, model_name, run.sae)
    tasks_by_seed = [binary_tasks(labels, seed, cfg.test_fraction) for seed in range(cfg.seeds)]
    result: dict[str, Any] = {"settings": asdict(cfg), "model": model_name, "hook": hook.name, "classes": classes,
              "documents": acts.n_docs, "tokens": int(acts.acts.shape[0]), "documents_s": model_s, "features": {}}
    started = time.perf_counter()
    result["features"][RAW] = {**evaluate_features(mean_pool(acts.acts, acts), tasks_by_seed, cfg),
                               "probe_s": time.perf_counter() - started}
    for run in loaded:
        started = time.perf_counter()
        features = pooled_codes(run.sae, acts)
        encoded = time.perf_counter()
        scores = evaluate_features(features, tasks_by_seed, cfg, expert_of_latents(run.sae), len(classes))
        result["features"][run.name] = {**scores, "arch": run.sae.cfg.arch, "width": run.sae.cfg.width,
                                        "n_experts": run.sae.cfg.n_experts, "encode_s": encoded - started,
                                        "probe_s": time.perf_counter() - encoded}
        if out:
            save_result(out, result)
        if progress:
            print(f"probed {run.name}: encode {encoded - started:.1f} s, probes {time.perf_counter() - encoded:.1f} s",
                  flush=True)
    return result


def format_probing(result: dict) -> str:
    """The table ``switchsae probe`` prints: mean balanced accuracy ± 95% interval over seeds."""
    settings = list(next(iter(result["features"].values()))["accuracy"])
    rows = []
    for name, scores in result["features"].items():
        row = {"features": name}
        for setting in settings:
            mean, half = mean_interval(scores["accuracy"][setting])
            row[setting] = f"{mean:.3f} ± {half:.3f}"
        rows.append(row)
    head = (f"sparse probing, {result['settings']['task']}: {len(result['classes'])} classes, "
            f"{result['documents']} documents, {result['settings']['seeds']} seeds; balanced accuracy\n")
    return head + markdown_table(rows, ["features", *settings])
