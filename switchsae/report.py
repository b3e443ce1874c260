"""The sweep report: ``report.md`` with tables and PNG figures, one section per setting.

First the results table and the paper's claims checked against them
(:mod:`switchsae.analysis.claims`); then, per setting (SPEC §4): MSE and ``1 − loss recovered`` against L0 with the Pareto front;
training FVU against step and against wall-clock seconds; for each Switch run the first log
step at which its training FVU reaches the final training FVU of the TopK run with the same
``k`` (sample efficiency); expert load; duplication across experts
(:func:`~switchsae.analysis.geometry.expert_duplication`) against the number of experts, one
line per ``k``; and router rows against their experts' mean decoder directions. A part whose
data is missing (no loss recovered, no Switch or TopK run, no log) is left out with a note.
"""
from __future__ import annotations

from pathlib import Path

from switchsae.analysis.claims import claims_section, duplication_lines, switch_label
from switchsae.analysis.geometry import expert_duplication, router_alignment
from switchsae.analysis.plots import bar_panels, line_panels
from switchsae.analysis.runs import find_runs, read_log, result_columns
from switchsae.analysis.tables import markdown_table
from switchsae.saes.io import load_sae

FIGURES = "figures"
DUPLICATION_THRESHOLD = 0.9


def _group(rows: list[dict], key) -> dict:
    """Rows grouped by ``key(row)``, groups in order of first appearance."""
    groups: dict = {}
    for row in rows:
        groups.setdefault(key(row), []).append(row)
    return groups


def _series_label(row: dict) -> str:
    """The line a run belongs to: its architecture (for Switch its expert count and lr law,
    :func:`~switchsae.analysis.claims.switch_label`), and its seed when not 0."""
    label = switch_label(row) if row["arch"] == "switch" else row["arch"]
    return label + (f" seed {row['seed']}" if row.get("seed") else "")


def _sparsity_label(row: dict) -> str:
    return f"k={row['k']}" if "k" in row else f"l1={row['l1_coeff']:g}"


def _figure_link(path: Path, title: str) -> str:
    return f"![{title}]({FIGURES}/{path.name})"


def _against_l0(setting: str, rows: list[dict], fig_dir: Path) -> list[str]:
    """MSE and (when measured) 1 − loss recovered against L0, one line per architecture / expert count."""
    parts = []
    for metric, title, value, logy in (("mse", "MSE", lambda r: r["mse"], True),
                                       ("loss_recovered", "1 - loss recovered", lambda r: 1 - r["loss_recovered"],
                                        False)):
        measured = [row for row in rows if metric in row]
        if not measured:
            parts.append(f"_{title} vs L0: not measured in this setting._")
            continue
        series = {label: ([r["l0"] for r in group], [value(r) for r in group])
                  for label, group in _group(measured, _series_label).items()}
        path = line_panels({f"{setting}: {title} vs L0": series}, fig_dir / f"{setting}_{metric}_vs_l0.png",
                           xlabel="L0", ylabel=title, logx=True, logy=logy, mark_front=True)
        parts.append(_figure_link(path, f"{title} vs L0"))
    return parts


def _training_curves(setting: str, rows: list[dict], fig_dir: Path) -> list[str]:
    """Training-batch FVU against step and against seconds, one panel per sparsity setting."""
    logged = [row for row in rows if row["log"]]
    if not logged:
        return ["_Training curves: no log.jsonl in this setting._"]
    parts = []
    for x_key, xlabel in (("step", "training step"), ("elapsed_s", "wall-clock seconds")):
        panels = {}
        for sparsity, group in _group(logged, _sparsity_label).items():
            panels[sparsity] = {_series_label(r): ([e[x_key] for e in r["log"]], [e["fvu"] for e in r["log"]])
                                for r in group}
        path = line_panels(panels, fig_dir / f"{setting}_fvu_vs_{x_key}.png", xlabel=xlabel,
                           ylabel="training FVU", logy=True)
        parts.append(_figure_link(path, f"FVU vs {xlabel}"))
    return parts


def steps_to_match(rows: list[dict]) -> list[dict]:
    """For each Switch run, the first log step whose training FVU is at most the final training FVU
    of the TopK run with the same setting and ``k``, and the ratio of the TopK's steps to it."""
    references = {(r["setting"], r["k"]): r for r in rows if r["arch"] == "topk" and r["log"]}
    table = []
    for row in rows:
        ref = references.get((row["setting"], row.get("k")))
        if row["arch"] != "switch" or ref is None or not row["log"]:
            continue
        target, ref_steps = ref["log"][-1]["fvu"], ref["log"][-1]["step"]
        step = next((e["step"] for e in row["log"] if e["fvu"] <= target), None)
        table.append({"setting": row["setting"], "run": row["name"], "k": row["k"], "topk_run": ref["name"], "topk_steps": ref_steps,
                      "topk_final_fvu": target, "step_reached": step if step else "not reached",
                      "speedup": ref_steps / step if step else ""})
    return table


def _sample_efficiency(rows: list[dict]) -> list[str]:
    table = steps_to_match(rows)
    if not table:
        return ["_Sample efficiency: needs a Switch and a TopK run with the same k._"]
    return ["Steps at which each Switch run's training FVU first reaches the TopK run's final training FVU:",
            markdown_table(table, list(table[0]))]


def _expert_load(setting: str, switch_rows: list[dict], fig_dir: Path) -> list[str]:
    bars = {row["name"]: row["expert_load"] for row in switch_rows}
    path = bar_panels(bars, fig_dir / f"{setting}_expert_load.png", xlabel="expert", ylabel="fraction of tokens",
                      mean_line=True)
    columns = ["name", "n_experts", "expert_load_cv", "expert_load_entropy", "expert_load_max_entropy"]
    return [_figure_link(path, "expert load"), markdown_table(switch_rows, columns)]


def switch_geometry(row: dict) -> dict:
    """Duplication and router alignment of the Switch SAE saved in ``row['run_dir']``."""
    sae = load_sae(row["run_dir"])
    n_experts = sae.cfg.n_experts
    dup = expert_duplication(sae.W_dec, n_experts, DUPLICATION_THRESHOLD)
    align = router_alignment(sae.get_parameter("W_router"), sae.W_dec, n_experts)
    return {"setting": row["setting"], "name": row["name"], "n_experts": n_experts, "k": sae.cfg.k,
            "lr_width": row.get("lr_width", "total"), "l0": row["l0"],
            "dup_frac_above": dup["frac_above"], "dup_mean_max_cos": dup["mean_max_cos"],
            "router_cos_mean": align.mean().item(), "router_cos_min": align.min().item(),
            "router_cos_max": align.max().item()}


def _geometry(setting: str, table: list[dict], fig_dir: Path) -> list[str]:
    """Duplication against the number of experts (one line per k) and the router-alignment table."""
    lines = {label: group for (_, label), group in duplication_lines(table).items()}
    metrics = {f"fraction with max cos > {DUPLICATION_THRESHOLD}": "dup_frac_above",
               "mean max cos to other experts": "dup_mean_max_cos"}
    panels = {title: {label: ([g["n_experts"] for g in group], [g[key] for g in group])
                      for label, group in lines.items()}
              for title, key in metrics.items()}
    path = line_panels(panels, fig_dir / f"{setting}_duplication.png", xlabel="experts N", logx=True)
    caption = ("Duplication (max cosine of each decoder row to another expert's rows) and router alignment "
               "(cosine of each router row with its expert's mean decoder direction):")
    columns = [c for c in table[0] if c != "setting"]
    return [_figure_link(path, "duplication vs experts"), caption, markdown_table(table, columns)]


def _setting_section(setting: str, rows: list[dict], geometry: list[dict], fig_dir: Path) -> list[str]:
    switch_rows = [row for row in rows if is_routed(row)]
    parts = [f"## Setting `{setting}`", *_against_l0(setting, rows, fig_dir), *_training_curves(setting, rows, fig_dir),
             *_sample_efficiency(rows)]
    if switch_rows:
        parts += [*_expert_load(setting, switch_rows, fig_dir), *_geometry(setting, geometry, fig_dir)]
    else:
        parts.append("_No Switch runs: no expert load or geometry._")
    return parts


def is_routed(row: dict) -> bool:
    """A Switch run with more than one expert (the ones with routing and duplication to report)."""
    return row["arch"] == "switch" and row["n_experts"] > 1


def write_report(out_dir: str | Path) -> Path:
    """Write ``report.md`` and ``figures/*.png`` for the evaluated runs in ``out_dir/<setting>/<run>/``."""
    out_dir = Path(out_dir)
    rows = find_runs(out_dir)
    if not rows:
        raise FileNotFoundError(f"{out_dir} holds no evaluated runs (no <setting>/<run>/metrics.json); "
                                "run `switchsae sweep` first.")
    for row in rows:
        row["log"] = read_log(row["run_dir"])
    geometry = [switch_geometry(row) for row in rows if is_routed(row)]
    parts = ["# Sweep report", f"{len(rows)} runs in `{out_dir}`.", "## Results",
             markdown_table(rows, result_columns(rows)), *claims_section(rows, steps_to_match(rows), geometry)]
    for setting, group in _group(rows, lambda r: r["setting"]).items():
        in_setting = [entry for entry in geometry if entry["setting"] == setting]
        parts += _setting_section(setting, group, in_setting, out_dir / FIGURES)
    path = out_dir / "report.md"
    path.write_text("\n\n".join(parts) + "\n")
    return path
