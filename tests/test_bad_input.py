"""What each bad input gets from the real command line: one row per case (the README's table).

Every row runs ``switchsae.cli.main(argv)`` in this process and checks the exit code and that
stderr is one line naming the problem (after argparse's usage lines, for argparse's own errors).
``{acts}``, ``{run}`` (a finished run), ``{tmp}`` and ``{file}`` (a plain file) in an argv are
filled in per test.
"""
from __future__ import annotations

import errno
import importlib
import sys

import pytest
import torch

from switchsae.cli import main

TRAIN = ["train", "--acts", "{acts}", "--out", "{tmp}/new", "--quiet", "--width", "32", "--steps", "2",
         "--batch-size", "64"]
TRAIN_ON = ["train", "--out", "{tmp}/new", "--quiet", "--width", "32", "--arch", "topk", "--acts"]  # + activations

CASES = [  # (id, argv, exit code, words the message must contain)
    ("k for relu", [*TRAIN, "--arch", "relu", "--k", "8"], 2, ["--k does not apply to --arch relu"]),
    ("l1 for topk", [*TRAIN, "--arch", "topk", "--l1", "2"], 2, ["--l1 does not apply", "relu, gated, jumprelu"]),
    ("experts for topk", [*TRAIN, "--arch", "topk", "--experts", "1"], 2, ["--experts does not apply"]),
    ("alpha for relu", [*TRAIN, "--arch", "relu", "--alpha", "1"], 2, ["--alpha does not apply"]),
    ("bf16 for relu", [*TRAIN, "--arch", "relu", "--matmul-dtype", "bfloat16"], 2, ["--matmul-dtype does not apply"]),
    ("sparse updates for gated", [*TRAIN, "--arch", "gated", "--sparse-updates"], 2, ["--sparse-updates does not"]),
    ("unknown arch", [*TRAIN, "--arch", "dense"], 2, ["argument --arch: invalid choice: 'dense'"]),
    ("k not a number", [*TRAIN, "--arch", "topk", "--k", "many"], 2, ["argument --k: invalid int value"]),
    ("k above width", [*TRAIN, "--arch", "topk", "--k", "33"], 2, ["k=33 exceeds the width 32"]),
    ("beta1 of 1", [*TRAIN, "--arch", "topk", "--beta1", "1"], 2, ["beta1 must lie in [0, 1), got 1.0"]),
    ("eps of 0", [*TRAIN, "--arch", "topk", "--eps", "0"], 2, ["eps must be a positive finite number"]),
    ("lr nan", [*TRAIN, "--arch", "topk", "--lr", "nan"], 2, ["lr must be a positive finite number, got nan"]),
    ("batch size 0", [*TRAIN, "--arch", "topk", "--batch-size", "0"], 2, ["batch_size must be a positive integer"]),
    ("negative seed", [*TRAIN, "--arch", "topk", "--seed", "-1"], 2, ["seed must be an integer in [0, 2**63)"]),
    ("seed 2**63", [*TRAIN, "--arch", "topk", "--seed", str(2**63)], 2, ["seed must be an integer in [0, 2**63)"]),
    ("bad matmul dtype", [*TRAIN, "--arch", "topk", "--matmul-dtype", "fp8"], 2, ["matmul_dtype must be auto"]),
    ("cuda without CUDA", [*TRAIN, "--arch", "topk", "--device", "cuda"], 2, ["needs a CUDA GPU"]),
    ("missing activations", [*TRAIN_ON, "{tmp}/nope.safetensors"], 2, ["nope.safetensors"]),
    ("activations not a cache", [*TRAIN_ON, "{tmp}"], 2, ["has no manifest.json"]),
    ("activations corrupt", [*TRAIN_ON, "{file}"], 2, ["plain-file"]),
    ("out under a file", [*TRAIN, "--arch", "topk", "--out", "{file}/run"], 2,
     ["cannot write to the run folder", "plain-file/run: Not a directory"]),
    ("out is a file", [*TRAIN, "--arch", "topk", "--out", "{file}"], 2, ["cannot write to the run folder"]),
    ("run exists", [*TRAIN, "--arch", "topk", "--out", "{run}"], 2, ["already holds a run; pass --resume"]),
    ("resume without checkpoint", [*TRAIN, "--arch", "topk", "--resume"], 2, ["no checkpoint at", "nothing to resume"]),
    ("resume other settings", [*TRAIN, "--arch", "topk", "--out", "{run}", "--resume", "--steps", "3"], 2,
     ["settings differ from the checkpoint in ['steps']"]),
    ("huge lr", [*TRAIN, "--arch", "topk", "--lr", "1e6", "--steps", "30"], 2,
     ["training diverged at step", "times its lowest running average", "no checkpoint was written"]),
    ("eval of no run", ["eval", "{tmp}", "--acts", "{acts}"], 2, ["cfg.json is missing"]),
    ("eval batch size 0", ["eval", "{run}", "--acts", "{acts}", "--batch-size", "0"], 2,
     ["argument --batch-size: must be a positive integer, got 0"]),
    ("synth tokens 0", ["synth", "--out", "{tmp}/s.safetensors", "--tokens", "0"], 2, ["must be a positive integer"]),
    ("synth into a folder", ["synth", "--out", "{tmp}", "--tokens", "10", "--d-model", "4"], 2, ["Is a directory"]),
    ("synth under a file", ["synth", "--out", "{file}/s.safetensors", "--tokens", "10"], 2, ["plain-file"]),
    ("missing sweep file", ["sweep", "{tmp}/nope.toml"], 2, ["nope.toml: No such file or directory"]),
    ("report of nothing", ["report", "{tmp}"], 2, ["holds no evaluated runs"]),
]


@pytest.fixture
def fill(tmp_path):
    """Replaces the placeholders of an argv."""
    from safetensors.torch import save_file

    from switchsae.sources.synthetic import synthetic_activations

    acts = tmp_path / "acts.safetensors"
    save_file({"activations": synthetic_activations(1000, 16, 64, 3, seed=0)}, str(acts))
    (tmp_path / "plain-file").write_text("not a folder")
    places = {"acts": acts, "tmp": tmp_path, "file": tmp_path / "plain-file", "run": tmp_path / "run"}

    def filled(argv: list[str]) -> list[str]:
        if any("{run}" in arg for arg in argv):
            main(["train", "--acts", str(acts), "--out", str(tmp_path / "run"), "--arch", "topk", "--width", "32",
                  "--steps", "2", "--batch-size", "64", "--quiet"])
        return [arg.format(**places) for arg in argv]
    return filled


@pytest.mark.parametrize("argv, code, words", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_gets_one_line_naming_it(fill, capsys, argv, code, words):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("this torch has CUDA")
    with pytest.raises(SystemExit) as exit_info:
        main(fill(argv))
    assert exit_info.value.code == code
    _assert_one_line(capsys.readouterr().err, words)


def _assert_one_line(err: str, words: list[str]) -> None:
    """One error line (after argparse's usage lines, if any) holding every one of ``words``."""
    lines = err.strip().splitlines()
    if len(lines) > 1:  # argparse's usage, then indented continuation lines
        assert lines[0].startswith("usage:") and all(line.startswith(" ") for line in lines[1:-1]), err
    assert lines[-1].startswith("switchsae ") and ": error: " in lines[-1], err
    for word in words:
        assert word in lines[-1], err


def test_a_full_disk_is_one_line(fill, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "runs/x/checkpoint.safetensors.tmp")
    monkeypatch.setattr(sys.modules["switchsae.train"], "save_checkpoint", full)
    with pytest.raises(SystemExit) as exit_info:
        main(fill([*TRAIN, "--arch", "topk"]))
    assert exit_info.value.code == 2
    _assert_one_line(capsys.readouterr().err, ["runs/x/checkpoint.safetensors.tmp: No space left on device"])


def test_a_missing_optional_package_says_how_to_install_it(fill, capsys, monkeypatch):
    import switchsae.report

    def plots(folder):  # what the report's plotting does first
        importlib.import_module("matplotlib.pyplot")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed: importing it fails
    monkeypatch.setattr(switchsae.report, "write_report", plots)
    with pytest.raises(SystemExit) as exit_info:
        main(fill(["report", "{tmp}"]))
    assert exit_info.value.code == 2
    _assert_one_line(capsys.readouterr().err, ["pip install matplotlib"])


def test_a_programming_error_keeps_its_traceback(fill, monkeypatch):
    def broken(*args, **kwargs):
        raise TypeError("a bug")
    monkeypatch.setattr(sys.modules["switchsae.train"], "train_loop", broken)
    with pytest.raises(TypeError, match="a bug"):
        main(fill([*TRAIN, "--arch", "topk"]))


def test_ctrl_c_before_any_checkpoint_says_none_was_written(fill, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(sys.modules["switchsae.train"], "train_loop", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        main(fill([*TRAIN, "--arch", "topk"]))
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.strip().endswith("switchsae train: interrupted; no checkpoint was written to "
                                                    f"{fill(['{tmp}'])[0]}/new")
