"""The command line end to end on synthetic activations, and its error messages."""
from __future__ import annotations

import json

import pytest

from switchsae.cli import build_parser, main
from switchsae.config import ARCHS
from switchsae.saes import REGISTRY


@pytest.fixture
def acts_file(tmp_path):
    path = tmp_path / "acts.safetensors"
    main(["synth", "--out", str(path), "--tokens", "3000", "--d-model", "32", "--features", "128", "--active", "4"])
    return path


def test_arch_choices_come_from_the_registry():
    assert set(ARCHS) == set(REGISTRY)
    train_parser = build_parser()._subparsers._group_actions[0].choices["train"]
    arch_action = next(a for a in train_parser._actions if a.dest == "arch")
    assert set(arch_action.choices) == set(REGISTRY)


def test_train_then_eval_writes_metrics(tmp_path, acts_file, capsys):
    run = tmp_path / "run"
    main(["train", "--acts", str(acts_file), "--arch", "switch", "--width", "256", "--k", "8", "--experts", "4",
          "--steps", "30", "--batch-size", "128", "--out", str(run), "--quiet"])
    main(["eval", str(run), "--acts", str(acts_file), "--quiet"])
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("mse", "fvu", "fve", "l0", "dead_frac", "flops_per_token", "train_flops_per_token",
                "expert_load", "expert_load_cv", "expert_load_entropy"):
        assert key in metrics
    assert metrics["l0"] <= 8
    assert "fvu" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--arch", "switch", "--width", "250", "--experts", "4"], "not divisible"),
    (["--arch", "topk", "--width", "64", "--k", "65"], "exceeds the width"),
])
def test_bad_settings_give_one_line_errors(tmp_path, acts_file, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--acts", str(acts_file), "--out", str(tmp_path / "r"), "--quiet", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_missing_and_corrupt_inputs_are_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--acts", str(tmp_path / "nope.safetensors"), "--arch", "topk", "--width", "64",
              "--out", str(tmp_path / "r")])
    assert "not found" in capsys.readouterr().err
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(SystemExit):
        main(["train", "--acts", str(bad), "--arch", "topk", "--width", "64", "--out", str(tmp_path / "r")])
    assert "bad.safetensors" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", str(tmp_path / "no-run"), "--acts", str(bad)])
    assert "cfg.json is missing" in capsys.readouterr().err


def test_sweep_check_report_and_bad_sweep_file(tmp_path, acts_file, capsys):
    config = tmp_path / "sweep.toml"
    config.write_text(f'acts = "{acts_file}"\nout = "{tmp_path / "sweep"}"\n[train]\nsteps = 3\nbatch_size = 128\n'
                      '[[grid]]\nname = "s"\narch = ["topk", "switch"]\nwidth = 64\nk = 4\nn_experts = [1, 2]\n')
    main(["sweep", str(config), "--check"])
    assert "3 runs" in capsys.readouterr().out
    main(["sweep", str(config), "--quiet"])
    main(["report", str(tmp_path / "sweep")])
    assert (tmp_path / "sweep" / "report.md").is_file()
    config.write_text(config.read_text() + "bogus = 1\n")
    with pytest.raises(SystemExit):
        main(["sweep", str(config), "--check"])
    assert "bogus" in capsys.readouterr().err
