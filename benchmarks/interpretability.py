"""Tables and figures of the interpretability comparison from the JSON that `switchsae probe` and
`switchsae absorption` write (one file per SAE seed or one for all; runs of one setting differ only
in their ``-seedN`` suffix and are grouped).

    python benchmarks/interpretability.py --probe runs/interp/probe_wiki_seed*.json \\
        runs/interp/probe_gut_seed*.json --absorption runs/interp/absorption_*.json \\
        --out docs/results/interpretability

Writes ``tables.md`` (pasted into the report) and ``figures/probing.png``. A setting's score is the
mean over its SAE seeds of each seed's mean over probe seeds; "±" is the 95% Student-t half-width
over SAE seeds (over probe seeds where there is one SAE seed; the column ``seeds`` says which).
"""
from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

from switchsae.analysis.plots import line_panels
from switchsae.analysis.tables import markdown_table
from switchsae.evals.probing import RAW
from switchsae.evals.stats import mean_interval

SEED_SUFFIX = r"-seed\d+$"


def setting_of(name: str, scores: dict) -> str:
    """A readable setting name: ``TopK 4096``, ``Switch 4 x 4096`` (total width / experts)."""
    if name == RAW:
        return RAW
    if scores.get("arch") == "switch":
        n = scores["n_experts"]
        return f"Switch {n} x {scores['width'] // n}"
    arch = {"topk": "TopK", "batchtopk": "BatchTopK"}.get(scores.get("arch"), scores.get("arch") or re.sub(SEED_SUFFIX, "", name))
    return f"{arch} {scores.get('width', '')}".strip()


def _cell(values: list[float], fallback: list[float]) -> str:
    """Mean of ``values`` ± the interval over them, or over ``fallback`` when there is one value."""
    half = mean_interval(values if len(values) > 1 else fallback)[1]
    return f"{sum(values) / len(values):.3f} ± {half:.3f}"


def probing_table(files: list[Path]) -> tuple[dict[str, str], dict[str, dict]]:
    """Per task, the markdown table of settings x m; and per task the series for the figure."""
    # task -> setting -> column -> per-SAE-seed values (each a mean over probe seeds), and probe-seed values
    by_task: dict[str, dict[str, dict[str, list]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    raw_seen: set[str] = set()  # the raw activations are the same in every file of a task
    for path in files:
        result = json.loads(path.read_text())
        task = result["settings"]["task"]
        for name, scores in result["features"].items():
            if name == RAW and task in raw_seen:
                continue
            if name == RAW:
                raw_seen.add(task)
            setting = by_task[task][setting_of(name, scores)]
            for column, values in scores["accuracy"].items():
                setting[column].append(sum(values) / len(values))
                setting[column + "/probe seeds"] = values
    tables, series = {}, {}
    for task, settings in by_task.items():
        columns = [c for c in next(iter(settings.values())) if "/" not in c]
        rows = []
        for setting, values in settings.items():
            n_sae = len(values[columns[0]])
            seeds = f"{n_sae} SAE" if n_sae > 1 else f"{len(values[columns[0] + '/probe seeds'])} probe"
            row = {"features": setting, "seeds": seeds}
            row.update({c: _cell(values[c], values[c + "/probe seeds"]) for c in columns})
            rows.append(row)
        tables[task] = markdown_table(rows, ["features", "seeds", *columns])
        ms = [c for c in columns if c.startswith("m=")]
        series[task] = {s: ([int(c[2:]) for c in ms], [sum(v[c]) / len(v[c]) for c in ms]) for s, v in settings.items()}
    return tables, series


def expert_table(files: list[Path]) -> str:
    """Switch: how concentrated each class's selected latents are in one expert, and per-expert probes."""
    rows = []
    for path in files:
        result = json.loads(path.read_text())
        for name, scores in result["features"].items():
            experts = scores.get("experts")
            if not experts:
                continue
            per_expert = [sum(v) / len(v) for v in next(v for k, v in experts.items() if k.endswith("per_expert"))]
            m = result["settings"]["expert_m"]
            whole = sum(scores["accuracy"][f"m={m}"]) / len(scores["accuracy"][f"m={m}"])
            rows.append({"task": result["settings"]["task"], "SAE": name,
                         "top-20 share in the class's main expert": experts["max_share_mean"],
                         "uniform": experts["uniform_share"], f"m={m} whole SAE": whole,
                         f"m={m} best expert": max(per_expert), f"m={m} worst expert": min(per_expert)})
    columns = list(rows[0]) if rows else []
    return markdown_table(rows, columns)


def absorption_table(files: list[Path]) -> str:
    """Per setting: mean absorption fraction, full-absorption rate, main latents, clear-main-latent share."""
    keys = ("mean_absorption_fraction", "mean_full_absorption_rate", "mean_main_latents", "clear_main_latent_share")
    settings: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for path in files:
        for name, scores in json.loads(path.read_text())["saes"].items():
            values = settings[setting_of(name, scores)]
            for key in keys:
                values[key].append(scores[key])
            values["letters"].append(scores["letters_evaluated"])
            values["k=1 F1"].append(sum(r["k_sparse_f1"][0] for r in scores["letters"]) / len(scores["letters"]))
            values["k=10 F1"].append(sum(r["k_sparse_f1"][-1] for r in scores["letters"]) / len(scores["letters"]))
            values["seconds"].append(scores["seconds"])
            if scores.get("n_experts", 1) > 1:
                full = [r for r in scores["letters"] if r.get("full_absorption_rate")]
                same = sum(r.get("full_absorptions_same_expert", 0) for r in full)
                count = sum(round(r["full_absorption_rate"] * r["probe_true_positives"]) for r in full)
                values["same expert"].append(same / count if count else float("nan"))
    rows = []
    for setting, values in settings.items():
        row = {"SAE": setting, "seeds": len(values["letters"]), "letters": sum(values["letters"]) / len(values["letters"])}
        for key in keys + ("k=1 F1", "k=10 F1", "same expert", "seconds"):
            if values.get(key):
                mean, half = mean_interval(values[key])
                row[key] = f"{mean:.3f} ± {half:.3f}" if len(values[key]) > 1 else f"{mean:.3f}"
        rows.append(row)
    return markdown_table(rows, ["SAE", "seeds", "letters", *keys, "k=1 F1", "k=10 F1", "same expert", "seconds"])


def expert_loads(runs: list[Path], cache: Path, rows: int = 100_000) -> str:
    """Each Switch run's share of the cache's first ``rows`` rows routed (top-1) to each expert."""
    import torch

    from switchsae.saes.io import load_sae
    from switchsae.sources.cache import ActivationCache

    x = ActivationCache(cache).read(0, rows)
    lines = []
    for run in runs:
        sae = load_sae(run)
        with torch.no_grad():
            chosen = sae.router_logits(x * sae.cfg.act_scale)[1].argmax(1)
        share = torch.bincount(chosen, minlength=sae.cfg.n_experts).float() / rows
        lines.append(f"| {run.name} | " + ", ".join(f"{v:.3f}" for v in share.tolist()) + " |")
    return "\n".join(["| SAE | share of tokens routed to expert 0, 1, ... |", "|---|---|", *lines])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probe", nargs="*", default=[], type=Path)
    parser.add_argument("--absorption", nargs="*", default=[], type=Path)
    parser.add_argument("--loads", nargs="*", default=[], type=Path, help="Switch runs whose expert loads to list")
    parser.add_argument("--cache", type=Path, help="activation cache the loads are measured on")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    parts = []
    if args.probe:
        tables, series = probing_table(args.probe)
        for task, table in tables.items():
            parts += [f"### Sparse probing, {task}", "", table, ""]
        parts += ["### Switch experts", "", expert_table(args.probe), ""]
        line_panels({f"sparse probing, {task}": s for task, s in series.items()}, args.out / "figures" / "probing.png",
                    xlabel="m (latents or dimensions selected)", ylabel="balanced accuracy", logx=True)
    if args.absorption:
        parts += ["### Feature absorption", "", absorption_table(args.absorption), ""]
    if args.loads:
        parts += ["### Expert loads (top-1 routing, first 100k rows of the cache)", "", expert_loads(args.loads, args.cache), ""]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tables.md").write_text("\n".join(parts))
    print("\n".join(parts))


if __name__ == "__main__":
    main()
