"""The sweep report: figures and report.md from a tiny sweep, and graceful gaps."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import save_file

from switchsae.report import steps_to_match, write_report
from switchsae.sources.synthetic import synthetic_activations
from switchsae.sweep import run_sweep

SWEEP = """acts = "{acts}"
out = "{out}"
[train]
steps = 6
batch_size = 64
log_every = 2
[[grid]]
name = "matched"
arch = ["topk", "switch"]
expert_width = 16
n_experts = [2, 4]
k = [2, 4]
[[grid]]
name = "fixed"
arch = ["topk", "relu"]
width = 32
k = 4
l1_coeff = [0.5, 2.0]
"""


@pytest.fixture(scope="module")
def sweep_out(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report")
    acts = root / "acts.safetensors"
    save_file({"activations": synthetic_activations(1000, 16, n_features=48, active=3)}, str(acts))
    config = root / "sweep.toml"
    config.write_text(SWEEP.format(acts=acts, out=root / "out"))
    run_sweep(config, progress=False)
    return root / "out"


def test_report_writes_every_figure_and_links_it(sweep_out):
    report = write_report(sweep_out).read_text()
    expected = ["matched_mse_vs_l0", "matched_fvu_vs_step", "matched_fvu_vs_elapsed_s", "matched_expert_load",
                "matched_duplication", "fixed_mse_vs_l0", "fixed_fvu_vs_step"]
    for stem in expected:
        png = sweep_out / "figures" / f"{stem}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"(figures/{stem}.png)" in report
    assert "## Setting `matched`" in report and "## Setting `fixed`" in report
    assert "1 - loss recovered vs L0: not measured" in report
    assert "_No Switch runs: no expert load or geometry._" in report
    assert "switch-M64-N4-k4" in report and "router_cos_mean" in report
    assert "### Claim 1 (FLOP-matched" in report and "setting `matched`" in report
    assert "Claim 2" not in report  # the fixed-width setting has no Switch run


def test_steps_to_match_pairs_each_switch_run_with_the_topk_of_its_k():
    def run(name, arch, k, fvus):
        return {"setting": "s", "name": name, "arch": arch, "k": k,
                "log": [{"step": 10 * (i + 1), "fvu": f} for i, f in enumerate(fvus)]}

    rows = [run("topk4", "topk", 4, [0.9, 0.5, 0.3]), run("sw4", "switch", 4, [0.6, 0.3, 0.2]),
            run("sw8", "switch", 8, [0.1]), run("slow", "switch", 4, [0.8, 0.7, 0.6])]
    table = steps_to_match(rows)
    assert [(r["run"], r["step_reached"], r["speedup"]) for r in table] == [("sw4", 20, 1.5),
                                                                           ("slow", "not reached", "")]


def test_report_without_evaluated_runs_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no evaluated runs"):
        write_report(tmp_path)


def test_loss_recovered_is_plotted_when_measured(sweep_out, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(sweep_out / "matched", out / "matched")
    for metrics_path in (out / "matched").glob("*/metrics.json"):
        metrics = json.loads(metrics_path.read_text())
        metrics_path.write_text(json.dumps({**metrics, "loss_recovered": 0.9}))
    report = write_report(out).read_text()
    assert "(figures/matched_loss_recovered_vs_l0.png)" in report
    assert (out / "figures" / "matched_loss_recovered_vs_l0.png").exists()
