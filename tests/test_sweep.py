"""Sweep files: grid expansion, validation naming the line, a tiny end-to-end sweep and its resume."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
from safetensors.torch import save_file

from switchsae.saes.io import WEIGHTS_FILE
from switchsae.sources.synthetic import synthetic_activations
from switchsae.sweep import GRID_FIELDS, NAME_LABELS, SweepConfigError, load_sweep, run_lock, run_sweep

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
HEADER = 'acts = "{acts}"\nout = "{out}"\n'
TINY_TRAIN = "[train]\nsteps = 5\nbatch_size = 64\ncheckpoint_every = 2\nlog_every = 1\n"


def write_sweep(tmp_path: Path, body: str, acts: Path | None = None) -> Path:
    path = tmp_path / "sweep.toml"
    path.write_text(HEADER.format(acts=acts or tmp_path / "acts.safetensors", out=tmp_path / "out") + body)
    return path


def names(path: Path) -> list[str]:
    return [f"{run.setting}/{run.name}" for run in load_sweep(path).runs]


def test_grid_is_the_cartesian_product_with_experts_forced_to_one_outside_switch(tmp_path):
    path = write_sweep(tmp_path, '[[grid]]\nname = "fixed"\narch = ["topk", "switch"]\nwidth = 64\n'
                                 'n_experts = [2, 4]\nk = [4, 8]\n')
    assert names(path) == ["fixed/topk-M64-k4", "fixed/topk-M64-k8", "fixed/switch-M64-N2-k4",
                           "fixed/switch-M64-N2-k8", "fixed/switch-M64-N4-k4", "fixed/switch-M64-N4-k8"]


def test_expert_width_makes_switch_width_experts_times_baseline_width(tmp_path):
    path = write_sweep(tmp_path, '[[grid]]\nname = "matched"\narch = ["topk", "switch"]\nexpert_width = 32\n'
                                 'n_experts = [2, 4]\nk = 8\n')
    widths = {run.name: run.params["width"] for run in load_sweep(path).runs}
    assert widths == {"topk-M32-k8": 32, "switch-M64-N2-k8": 64, "switch-M128-N4-k8": 128}


def test_sparsity_keys_apply_per_architecture_and_grids_may_share_a_setting(tmp_path):
    path = write_sweep(tmp_path, '[[grid]]\nname = "s"\narch = ["topk", "relu"]\nwidth = 32\nk = [4, 8]\n'
                                 'l1_coeff = [1, 2.5]\n\n[[grid]]\nname = "s"\narch = "topk"\nwidth = 32\nk = 8\n')
    assert names(path) == ["s/topk-M32-k4", "s/topk-M32-k8", "s/relu-M32-lam1", "s/relu-M32-lam2.5"]


def test_training_keys_an_architecture_never_reads_are_dropped_for_it(tmp_path):
    path = write_sweep(tmp_path, '[[grid]]\nname = "s"\narch = ["topk", "relu"]\nwidth = 32\n'
                                 'matmul_dtype = ["float32", "bfloat16"]\n')
    assert names(path) == ["s/topk-M32-k32-matmul_dtype_float32", "s/topk-M32-k32-matmul_dtype_bfloat16",
                           "s/relu-M32-lam5"]


def test_run_names_spell_every_setting_a_grid_can_vary():
    assert set(GRID_FIELDS) - {"arch", "width"} == set(NAME_LABELS)


@pytest.mark.parametrize("body, line, message", [
    ('[[grid]]\nname = "a"\narch = "topk"\nwidht = 64\n', 6, "unknown key 'widht'"),
    ('steps = 3\n[[grid]]\nname = "a"\narch = "topk"\nwidth = 64\n', 3, "unknown key 'steps' in the top level"),
    ('[train]\nsteps = 3\nbatchsize = 8\n[[grid]]\nname = "a"\narch = "topk"\nwidth = 64\n', 5,
     "unknown key 'batchsize' in \\[train\\]"),
    ('[[grid]]\nname = "a"\narch = "topk"\nwidth = 64\n[[grid]]\nname = "b"\narch = "topk"\n\nexpert_width = 8\n'
     'k = [4, "8"]\n', 12, "k in \\[\\[grid\\]\\] #2 \\('b'\\) must be of type int"),
    ('[[grid]]\nname = "a"\narch = ["topk", "sitch"]\nwidth = 64\n', 5, "unknown architecture 'sitch'"),
    ('[[grid]]\nname = "a"\narch = "relu"\nwidth = 64\nk = 8\n', 7, "k in .* applies to none"),
    ('[[grid]]\nname = "a"\narch = "gated"\nwidth = 64\nsparse_updates = true\n', 7,
     "sparse_updates in .* applies to none.*switch, topk, batchtopk"),
    ('[[grid]]\nname = "a"\narch = "topk"\nwidth = 64\nexpert_width = 8\n', 3, "exactly one of width"),
    ('[train]\nsteps = 0\n[[grid]]\nname = "a"\narch = "topk"\nwidth = 64\n', 3, "\\[train\\] is invalid"),
])
def test_bad_sweep_files_fail_naming_the_line(tmp_path, body, line, message):
    with pytest.raises(SweepConfigError, match=f"sweep.toml, line {line}: .*{message}"):
        load_sweep(write_sweep(tmp_path, body))


def test_impossible_combination_fails_before_any_run_folder_is_made(tmp_path):
    body = (TINY_TRAIN + '[[grid]]\nname = "ok"\narch = "topk"\nwidth = 32\nk = 4\n\n'
            '[[grid]]\nname = "bad"\narch = "switch"\nwidth = 64\nn_experts = [2, 8]\nk = 16\n')
    path = write_sweep(tmp_path, body)
    message = (r"line 14: \[\[grid\]\] #2 \('bad'\) contains an impossible combination "
               r"\(.*n_experts=8, k=16\): k=16 exceeds the width of one expert \(8 latents\)")
    with pytest.raises(SweepConfigError, match=message):
        run_sweep(path, progress=False)
    assert not (tmp_path / "out").exists()


def test_shipped_configs_hold_the_two_paper_settings():
    fixed = load_sweep(CONFIGS / "paper_fixed_width.toml")
    matched = load_sweep(CONFIGS / "paper_flop_matched.toml")
    assert {r.params["width"] for r in fixed.runs} == {8192}
    assert {r.params.get("n_experts") for r in fixed.runs if r.params["arch"] == "switch"} == {16, 32, 64}
    widths = {(r.params["arch"], r.params.get("n_experts", 1)): r.params["width"] for r in matched.runs}
    assert widths[("topk", 1)] == widths[("relu", 1)] == 2048
    assert [widths[("switch", n)] for n in (2, 4, 8)] == [4096, 8192, 16384]
    for sweep in (fixed, matched):
        assert {r.params["k"] for r in sweep.runs if "k" in r.params} == {16, 32, 64, 128}
    assert len(load_sweep(CONFIGS / "smoke.toml").runs) > 0


@pytest.fixture
def tiny_sweep(tmp_path) -> Path:
    """A sweep of a TopK, a FLOP-matched Switch and a ReLU SAE on synthetic d=16 activations."""
    acts = tmp_path / "acts.safetensors"
    save_file({"activations": synthetic_activations(1200, 16, n_features=48, active=3)}, str(acts))
    body = (TINY_TRAIN + '[[grid]]\nname = "matched"\narch = ["topk", "switch"]\nexpert_width = 32\n'
            'n_experts = 2\nk = 4\n\n[[grid]]\nname = "matched"\narch = "relu"\nexpert_width = 32\nl1_coeff = 1.0\n')
    return write_sweep(tmp_path, body, acts)


def test_sweep_trains_evaluates_gathers_and_resumes(tiny_sweep, tmp_path):
    rows = run_sweep(tiny_sweep, progress=False)
    out = tmp_path / "out"
    assert [r["name"] for r in rows] == ["relu-M32-lam1", "switch-M64-N2-k4", "topk-M32-k4"]
    with (out / "results.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert [row["name"] for row in table] == [r["name"] for r in rows]
    assert {"setting", "mse", "fvu", "l0", "dead_frac", "flops_per_token", "train_s", "tokens_per_s"} <= set(table[0])
    assert "loss_recovered" not in table[0]
    assert "| matched | switch-M64-N2-k4 | switch |" in (out / "results.md").read_text()

    weights = out / "matched" / "switch-M64-N2-k4" / WEIGHTS_FILE
    stamp = weights.stat().st_mtime_ns
    killed = out / "matched" / "topk-M32-k4"
    (killed / WEIGHTS_FILE).unlink()  # as if killed after the last checkpoint
    (killed / "metrics.json").unlink()
    again = run_sweep(tiny_sweep, progress=False)
    assert weights.stat().st_mtime_ns == stamp
    assert (killed / "metrics.json").exists()
    assert [r["fvu"] for r in again] == pytest.approx([r["fvu"] for r in rows])


def test_a_run_another_process_holds_is_skipped_and_done_by_a_later_sweep(tiny_sweep, tmp_path,
                                                                         locked_by_another_process):
    held = tmp_path / "out" / "matched" / "switch-M64-N2-k4"
    with run_lock(held) as mine:
        assert mine
        with run_lock(held) as again:  # re-entrant in this process (a sweep's train() takes it again)
            assert again
    with locked_by_another_process(held):
        with run_lock(held) as mine:
            assert not mine
        rows = run_sweep(tiny_sweep, progress=False)
    assert [r["name"] for r in rows] == ["relu-M32-lam1", "topk-M32-k4"]
    assert not (held / WEIGHTS_FILE).exists()
    assert [r["name"] for r in run_sweep(tiny_sweep, progress=False)] == [
        "relu-M32-lam1", "switch-M64-N2-k4", "topk-M32-k4"]


def test_grids_may_cross_training_settings_which_name_their_runs(tmp_path):
    body = (TINY_TRAIN + '[[grid]]\nname = "lr"\narch = "switch"\nexpert_width = 32\nn_experts = 2\nk = 4\n'
            'lr_width = ["total", "expert"]\nseed = [0, 1]\n')
    runs = load_sweep(write_sweep(tmp_path, body, tmp_path / "acts.safetensors")).runs
    assert [r.name for r in runs] == [f"switch-M64-N2-k4-lr_width_{w}-seed_{s}" for w in ("total", "expert") for s in (0, 1)]
    assert [(r.train.lr_width, r.train.seed, r.train.steps) for r in runs] == [
        ("total", 0, 5), ("total", 1, 5), ("expert", 0, 5), ("expert", 1, 5)]
    bad = write_sweep(tmp_path, body.replace('"expert"]', '"both"]'), tmp_path / "acts.safetensors")
    with pytest.raises(SweepConfigError, match="line 8: .*impossible combination.*lr_width must be total or expert"):
        load_sweep(bad)


def test_sweeps_sharing_an_out_folder_gather_into_one_table(tiny_sweep, tmp_path):
    run_sweep(tiny_sweep, progress=False)
    other = tmp_path / "other.toml"
    other.write_text(tiny_sweep.read_text().split("[[grid]]")[0] + '[[grid]]\nname = "lr"\narch = "switch"\n'
                     'expert_width = 32\nn_experts = 2\nk = 4\nlr_width = "expert"\n')
    rows = run_sweep(other, progress=False)
    assert [(r["setting"], r["name"], r["lr_width"]) for r in rows] == [
        ("lr", "switch-M64-N2-k4-lr_width_expert", "expert"), ("matched", "relu-M32-lam1", "expert"),
        ("matched", "switch-M64-N2-k4", "expert"), ("matched", "topk-M32-k4", "expert")]
    table = (tmp_path / "out" / "results.md").read_text().splitlines()
    assert sum(line.startswith(("| lr |", "| matched |")) for line in table) == 4


def test_sweep_refuses_a_run_folder_trained_with_other_settings(tiny_sweep, tmp_path):
    run_sweep(tiny_sweep, progress=False)
    tiny_sweep.write_text(tiny_sweep.read_text().replace("steps = 5", "steps = 6"))
    with pytest.raises(ValueError, match="topk-M32-k4 holds a run with other settings \\(steps\\)"):
        run_sweep(tiny_sweep, progress=False)
