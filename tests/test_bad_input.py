"""What each bad input gets from the real command line: one row per case (the README's table).

Every row runs ``switchsae.cli.main(argv)`` in this process and checks the exit code and that
stderr is one line naming the problem (after argparse's usage lines, for argparse's own errors).
``{acts}``, ``{run}`` (a finished run), ``{tmp}`` and ``{file}`` (a plain file) in an argv are
filled in per test, and so are the damaged inputs of :data:`DAMAGED` (made only where a case uses them).
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
    ("cache shard damaged", [*TRAIN_ON, "{damaged_cache}"], 2,
     ["Shard shard_00001.bin of the cache in", "fails its sha256 check (block 0 of 1); it is corrupt"]),
    ("cache shard damaged, older cache", [*TRAIN_ON, "{damaged_old_cache}", "--batch-size", "64", "--steps", "40"], 2,
     ["Shard shard_00001.bin of the cache in", "fails its sha256 check; it is corrupt"]),
    ("cache holds NaN", [*TRAIN_ON, "{nan_cache}", "--batch-size", "64", "--steps", "40"], 2,
     ["Shard shard_00002.bin of the cache in", "holds NaN or inf values (first at row 7 of the shard)"]),
    ("cache --check on a damaged cache", ["cache", "--check", "{damaged_old_cache}"], 2,
     ["Shard shard_00001.bin", "fails its sha256 check"]),
    ("cache without --layer", ["cache", "--tokens", "10", "--out", "{tmp}/c"], 2,
     ["building a cache needs --layer (or give --check CACHE to verify one)"]),
    ("cache of an unknown model", ["cache", "--model", "{tmp}/no-model", "--layer", "1", "--tokens", "10",
                                   "--out", "{tmp}/c"], 2, ["Cannot load model", "no-model"]),
    ("resume on other activations", [*TRAIN, "--arch", "topk", "--out", "{run}", "--resume", "--acts", "{acts2}"], 2,
     ["cannot resume", "it was trained on other activations (1,000 x 16 activations", "than these (1,000 x 16"]),
    ("resume a damaged checkpoint", [*TRAIN, "--arch", "topk", "--out", "{damaged_run}", "--resume"], 2,
     ["checkpoint", "fails its checksum: it changed after it was written"]),
    ("eval of NaN weights", ["eval", "{nan_run}", "--acts", "{acts}"], 2,
     ["the SAE's weights hold NaN or inf values (W_dec: 1 of 512)", "not evaluated"]),
    ("eval of no run", ["eval", "{tmp}", "--acts", "{acts}"], 2, ["cfg.json is missing"]),
    ("eval batch size 0", ["eval", "{run}", "--acts", "{acts}", "--batch-size", "0"], 2,
     ["argument --batch-size: must be a positive integer, got 0"]),
    ("synth tokens 0", ["synth", "--out", "{tmp}/s.safetensors", "--tokens", "0"], 2, ["must be a positive integer"]),
    ("synth into a folder", ["synth", "--out", "{tmp}", "--tokens", "10", "--d-model", "4"], 2, ["Is a directory"]),
    ("synth under a file", ["synth", "--out", "{file}/s.safetensors", "--tokens", "10"], 2, ["plain-file"]),
    ("missing sweep file", ["sweep", "{tmp}/nope.toml"], 2, ["nope.toml: No such file or directory"]),
    ("report of nothing", ["report", "{tmp}"], 2, ["holds no evaluated runs"]),
]


def _flip_byte(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _cache(tmp_path, name: str, rows: torch.Tensor):
    from switchsae.sources.shards import write_cache

    return write_cache(tmp_path / name, rows, 250)


def _damaged_cache(tmp_path, acts, name="damaged-cache", old=False):
    """A cache whose shard 1 has one byte changed; ``old``: without block checksums, as built before them."""
    import json

    folder = _cache(tmp_path, name, acts)
    if old:
        manifest = json.loads((folder / "manifest.json").read_text())
        for entry in manifest["shards"]:
            del entry["block_bytes"], entry["block_sha256"]
        (folder / "manifest.json").write_text(json.dumps(manifest))
    _flip_byte(folder / "shard_00001.bin", 99)
    return folder


def _nan_cache(tmp_path, acts):
    rows = acts.clone()
    rows[507, 3] = float("nan")  # shard 2, row 7
    return _cache(tmp_path, "nan-cache", rows)


def _damaged_run(tmp_path, acts):
    run = tmp_path / "damaged-run"
    main([*[a.format(acts=acts, tmp=tmp_path) for a in TRAIN], "--arch", "topk", "--out", str(run)])
    _flip_byte(run / "checkpoint.safetensors", -3)
    return run


def _nan_run(tmp_path, acts):
    from safetensors.torch import load_file, save_file

    run = tmp_path / "nan-run"
    main([*[a.format(acts=acts, tmp=tmp_path) for a in TRAIN], "--arch", "topk", "--out", str(run)])
    weights = load_file(str(run / "switchsae_weights.safetensors"))
    weights["W_dec"][5, 5] = float("nan")
    save_file(weights, str(run / "switchsae_weights.safetensors"))
    return run


#: placeholders for damaged inputs: (tmp_path, activations tensor) -> path
DAMAGED = {
    "damaged_cache": _damaged_cache,
    "damaged_old_cache": lambda tmp, acts: _damaged_cache(tmp, acts, "damaged-old-cache", old=True),
    "nan_cache": _nan_cache,
    "damaged_run": _damaged_run,
    "nan_run": _nan_run,
}


@pytest.fixture
def fill(tmp_path):
    """Replaces the placeholders of an argv."""
    from safetensors.torch import save_file

    from switchsae.sources.synthetic import synthetic_activations

    acts, acts2 = tmp_path / "acts.safetensors", tmp_path / "acts2.safetensors"
    rows = synthetic_activations(1000, 16, 64, 3, seed=0)
    save_file({"activations": rows}, str(acts))
    save_file({"activations": synthetic_activations(1000, 16, 64, 3, seed=1)}, str(acts2))
    (tmp_path / "plain-file").write_text("not a folder")
    places = {"acts": acts, "acts2": acts2, "tmp": tmp_path, "file": tmp_path / "plain-file", "run": tmp_path / "run"}

    def filled(argv: list[str]) -> list[str]:
        if any("{run}" in arg for arg in argv):
            main(["train", "--acts", str(acts), "--out", str(tmp_path / "run"), "--arch", "topk", "--width", "32",
                  "--steps", "2", "--batch-size", "64", "--quiet"])
        for name, make in DAMAGED.items():
            if any(f"{{{name}}}" in arg for arg in argv):
                places[name] = make(tmp_path, acts if name.endswith("run") else rows)
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
