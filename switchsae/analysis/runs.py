"""Finished run folders as rows: settings (the SAE config), metrics (metrics.json) and training speed (log.jsonl)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from switchsae.analysis.tables import markdown_table
from switchsae.config import L1_FAMILY, TOPK_FAMILY
from switchsae.saes.io import read_cfg_dict
from switchsae.train import TRAIN_CFG_FILE

RESULT_COLUMNS = ["setting", "name", "arch", "width", "n_experts", "k", "l1_coeff", "lr_width", "seed", "mse", "fvu", "l0", "dead_frac",
                  "loss_recovered", "flops_per_token", "train_flops_per_token", "train_s", "tokens_per_s"]


def read_log(run_dir: str | Path) -> list[dict]:
    """The training log: one dict per log step (step, tokens, mse, fvu, l0, dead_frac, elapsed_s, ...)."""
    path = Path(run_dir) / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def run_summary(run_dir: str | Path, setting: str) -> dict:
    """One row per run: its settings, every metric in metrics.json, and training seconds and tokens/s.

    ``k`` appears only for the TopK family and ``l1_coeff`` only for the L1 family, where they
    set the sparsity; ``lr_width`` and ``seed`` come from the run's training config where the run has
    one; ``train_s`` is the wall-clock time of the last log step.
    """
    run_dir = Path(run_dir)
    cfg = read_cfg_dict(run_dir)
    row = {"setting": setting, "name": run_dir.name, "run_dir": run_dir,
           "arch": cfg["arch"], "width": cfg["width"], "n_experts": cfg["n_experts"]}
    train_cfg_path = run_dir / TRAIN_CFG_FILE
    if train_cfg_path.exists():
        train_cfg = json.loads(train_cfg_path.read_text())
        row.update(lr_width=train_cfg["lr_width"], seed=train_cfg["seed"])
    if cfg["arch"] in TOPK_FAMILY:
        row["k"] = cfg["k"]
    if cfg["arch"] in L1_FAMILY:
        row["l1_coeff"] = cfg["l1_coeff"]
    row.update(json.loads((run_dir / "metrics.json").read_text()))
    log = read_log(run_dir)
    if log and log[-1]["elapsed_s"] > 0:
        row.update(train_s=log[-1]["elapsed_s"], tokens_per_s=log[-1]["tokens"] / log[-1]["elapsed_s"])
    return row


def find_runs(out_dir: str | Path) -> list[dict]:
    """Summaries of every evaluated run under ``out_dir/<setting>/<run>/``, in name order."""
    return [run_summary(metrics.parent, metrics.parent.parent.name)
            for metrics in sorted(Path(out_dir).glob("*/*/metrics.json"))]


def result_columns(rows: list[dict]) -> list[str]:
    """The columns of :data:`RESULT_COLUMNS` that at least one row has."""
    return [column for column in RESULT_COLUMNS if any(column in row for row in rows)]


def write_results(rows: list[dict], out_dir: str | Path) -> tuple[Path, Path]:
    """``results.csv`` and ``results.md`` in ``out_dir``, one row per run."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = result_columns(rows)
    csv_path, md_path = out_dir / "results.csv", out_dir / "results.md"
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    md_path.write_text(markdown_table(rows, columns) + "\n")
    return csv_path, md_path
