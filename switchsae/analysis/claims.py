"""The paper's claims (SPEC §4) checked against a sweep's runs: one table and one verdict each.

Every Switch run is paired with the TopK run of its setting with the same ``k`` and seed (the
reference). A setting is *FLOP-matched* when its Switch SAEs are ``N`` times the TopK's width
and *fixed width* when they are as wide. Against the L1 baselines (ReLU, Gated), whose L0 is
not set directly, a Switch run is compared with the baseline's MSE interpolated at the Switch
run's L0: linear in ``(log L0, log MSE)`` between the two nearest baseline runs, and only
inside the L0 range the baseline's runs cover. Outside it, a baseline run still counts as
*dominated* by a Switch series when one of the series' runs has no more latents active and no
more MSE.
"""
from __future__ import annotations

import math

from switchsae.analysis.tables import markdown_table

L1_BASELINES = ("relu", "gated")


def setting_kind(rows: list[dict]) -> str | None:
    """``"flop_matched"``, ``"fixed_width"`` or ``None`` (no Switch and TopK runs, or mixed widths)."""
    topk_widths = {r["width"] for r in rows if r["arch"] == "topk"}
    switch = [r for r in rows if r["arch"] == "switch"]
    if len(topk_widths) != 1 or not switch:
        return None
    (width,) = topk_widths
    if all(r["width"] == width for r in switch):
        return "fixed_width"
    if all(r["width"] == r["n_experts"] * width for r in switch):
        return "flop_matched"
    return None


def interpolate_log(points: list[tuple[float, float]], x: float) -> float | None:
    """``y`` at ``x`` on the piecewise-linear curve through ``points`` in log-log space; ``None``
    outside the range of their ``x``."""
    points = sorted(points)
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            if x0 == x1:
                return y0
            t = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return math.exp((1 - t) * math.log(y0) + t * math.log(y1))
    return points[0][1] if len(points) == 1 and points[0][0] == x else None


def lr_tag(row: dict) -> str:
    """`` lr(M/N)`` for a run whose learning-rate law used the expert width, else empty."""
    return " lr(M/N)" if row.get("lr_width") == "expert" else ""


def switch_label(row: dict) -> str:
    """A Switch run's series: its expert count and learning-rate law, e.g. ``switch N=4 lr(M/N)``."""
    return f"switch N={row['n_experts']}{lr_tag(row)}"


def paired_comparisons(rows: list[dict]) -> list[dict]:
    """Each Switch run against its setting's TopK run with the same ``k`` and seed, and against
    each L1 baseline at the same L0 (where the baseline's runs bracket it)."""
    topk = {(r["k"], r.get("seed", 0)): r for r in rows if r["arch"] == "topk"}
    baselines = {arch: [(r["l0"], r["mse"]) for r in rows if r["arch"] == arch and r["l0"] > 0]
                 for arch in L1_BASELINES}
    table = []
    for row in rows:
        ref = topk.get((row.get("k"), row.get("seed", 0)))
        if row["arch"] != "switch" or ref is None:
            continue
        entry = {"run": row["name"], "series": switch_label(row), "k": row["k"],
                 "mse_vs_topk": row["mse"] / ref["mse"] - 1,
                 "flops_vs_topk": row["flops_per_token"] / ref["flops_per_token"]}
        if "loss_recovered" in row and "loss_recovered" in ref:
            entry["lr_minus_topk"] = row["loss_recovered"] - ref["loss_recovered"]
        for arch, points in baselines.items():
            at_l0 = interpolate_log(points, row["l0"]) if points else None
            if at_l0 is not None:
                entry[f"mse_vs_{arch}"] = row["mse"] / at_l0 - 1
        table.append(entry)
    experts = {row["name"]: row["n_experts"] for row in rows}
    return sorted(table, key=lambda e: (experts[e["run"]], e["series"], e["k"]))


def _percent(value: float) -> str:
    return f"{value:+.1%}"


def _count(table: list[dict], key: str, better) -> str:
    have = [e for e in table if key in e]
    return f"{sum(better(e[key]) for e in have)}/{len(have)}" if have else "n/a"


def dominated(baseline: list[dict], runs: list[dict]) -> int:
    """How many ``baseline`` runs some run of ``runs`` matches or beats on both L0 and MSE."""
    return sum(any(r["l0"] <= b["l0"] and r["mse"] <= b["mse"] for r in runs) for b in baseline)


def _series_verdicts(table: list[dict], rows: list[dict]) -> list[dict]:
    """Per Switch series: at how many k it beats TopK on MSE and on loss recovered, and the L1
    baselines on MSE at equal L0; how many L1 baseline runs it dominates."""
    by_name = {r["name"]: r for r in rows}
    verdicts = []
    for series in dict.fromkeys(e["series"] for e in table):
        group = [e for e in table if e["series"] == series]
        verdict = {"series": series,
                   "MSE below TopK": _count(group, "mse_vs_topk", lambda v: v < 0),
                   "loss recovered above TopK": _count(group, "lr_minus_topk", lambda v: v > 0)}
        for arch in L1_BASELINES:
            baseline = [r for r in rows if r["arch"] == arch]
            verdict[f"MSE below {arch}"] = _count(group, f"mse_vs_{arch}", lambda v: v < 0)
            verdict[f"{arch} runs dominated"] = (f"{dominated(baseline, [by_name[e['run']] for e in group])}/"
                                                 f"{len(baseline)}" if baseline else "n/a")
        verdict["mean MSE vs TopK"] = _percent(sum(e["mse_vs_topk"] for e in group) / len(group))
        verdict["FLOPs vs TopK"] = (f"{min(e['flops_vs_topk'] for e in group):.3f}-"
                                    f"{max(e['flops_vs_topk'] for e in group):.3f}x")
        verdicts.append(verdict)
    return verdicts


def duplication_lines(duplication: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """Duplication entries grouped by setting and by ``k`` (with ``lr(M/N)`` when the lr follows the
    expert width): the lines along which duplication is read against the number of experts."""
    lines: dict[tuple[str, str], list[dict]] = {}
    for entry in duplication:
        label = f"k={entry['k']}{lr_tag(entry)}"
        lines.setdefault((entry["setting"], label), []).append(entry)
    return lines


def _formatted(table: list[dict]) -> list[dict]:
    return [{key: _percent(value) if key.startswith("mse_vs") else
             (f"{value:+.4f}" if key == "lr_minus_topk" else value) for key, value in entry.items()} for entry in table]


def claims_section(rows: list[dict], sample_efficiency: list[dict], duplication: list[dict]) -> list[str]:
    """Markdown for SPEC §4 claims 1-5 from every setting's runs, the table of
    :func:`switchsae.report.steps_to_match` and the duplication table of the Switch runs."""
    parts = ["## The paper's claims (SPEC §4), checked",
             "Each Switch run against the TopK run of its setting with the same k and seed "
             "(`mse_vs_*`: relative MSE difference, negative is better; `lr_minus_topk`: loss recovered "
             "difference, positive is better); against ReLU/Gated at the same L0 where their runs bracket it, "
             "and by dominance (a Switch run with no higher L0 and no higher MSE)."]
    settings: dict[str, list[dict]] = {}
    for row in rows:
        settings.setdefault(row["setting"], []).append(row)
    kinds = {setting: setting_kind(group) for setting, group in settings.items()}
    titles = {"flop_matched": "Claim 1 (FLOP-matched: Switch is a Pareto improvement over TopK, Gated and ReLU)",
              "fixed_width": "Claims 2 and 5 (fixed width: Switch is below TopK; Switch-16 beats Gated, Switch-64 "
                             "beats ReLU; at other sites Switch is slightly below TopK)"}
    for setting, group in settings.items():
        kind = kinds[setting]
        table = paired_comparisons(group) if kind else []
        if not table or kind is None:
            continue
        verdicts = _series_verdicts(table, group)
        parts += [f"### {titles[kind]}: setting `{setting}`", markdown_table(verdicts, list(verdicts[0])),
                  markdown_table(_formatted(table), list(dict.fromkeys(key for e in table for key in e)))]
    parts.append("### Claim 3 (FLOP-matched Switch reaches TopK's MSE in ~5x fewer steps)")
    flop_matched = {setting for setting, kind in kinds.items() if kind == "flop_matched"}
    sample_efficiency = [e for e in sample_efficiency if e["setting"] in flop_matched]
    reached = [e for e in sample_efficiency if e["speedup"]]
    if sample_efficiency:
        best = max((e["speedup"] for e in reached), default=None)
        parts.append(f"{len(reached)}/{len(sample_efficiency)} FLOP-matched Switch runs reach their TopK's final "
                     f"training FVU before their last step" + (f"; the largest speedup is {best:.2f}x: " if best else ".")
                     + ", ".join(f"{e['run']} {e['speedup']:.2f}x" for e in reached))
    else:
        parts.append("_Needs Switch and TopK runs with the same k._")
    parts.append("### Claim 4 (more experts, more duplicated features; less at larger L0)")
    if duplication:
        lines = ["Mean max cosine of each decoder row to another expert's rows (fraction above 0.9), by N:"]
        lines += [f"- `{setting}` {label}: " + ", ".join(
                      f"N={e['n_experts']}: {e['dup_mean_max_cos']:.3f} ({e['dup_frac_above']:.3f})"
                      for e in sorted(group, key=lambda e: e["n_experts"]))
                  for (setting, label), group in duplication_lines(duplication).items()]
        parts += ["\n".join(lines)]
    else:
        parts.append("_No Switch runs._")
    return parts
