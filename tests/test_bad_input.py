"""What each bad input gets from the real command line: one row per case (the README's table).

Every row runs ``switchsae.cli.main(argv)`` in this process and checks the exit code and that
stderr is one line naming the problem. ``{acts}``, ``{run}`` (a finished run), ``{tmp}`` and
``{file}`` (a plain file) in an argv are filled in per test.
"""
from __future__ import annotations

import pytest

from switchsae.cli import main

TRAIN = ["train", "--acts", "{acts}", "--out", "{tmp}/new", "--quiet", "--width", "32", "--steps", "2",
         "--batch-size", "64"]

CASES = [  # (id, argv, exit code, words the message must contain)
    ("k for relu", [*TRAIN, "--arch", "relu", "--k", "8"], 2, ["--k does not apply to --arch relu"]),
    ("l1 for topk", [*TRAIN, "--arch", "topk", "--l1", "2"], 2, ["--l1 does not apply", "relu, gated, jumprelu"]),
    ("experts for topk", [*TRAIN, "--arch", "topk", "--experts", "1"], 2, ["--experts does not apply"]),
    ("alpha for relu", [*TRAIN, "--arch", "relu", "--alpha", "1"], 2, ["--alpha does not apply"]),
    ("bf16 for relu", [*TRAIN, "--arch", "relu", "--matmul-dtype", "bfloat16"], 2, ["--matmul-dtype does not apply"]),
    ("sparse updates for gated", [*TRAIN, "--arch", "gated", "--sparse-updates"], 2, ["--sparse-updates does not"]),
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
    return lambda argv: [arg.format(**places) for arg in argv]


@pytest.mark.parametrize("argv, code, words", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_gets_one_line_naming_it(fill, capsys, argv, code, words):
    with pytest.raises(SystemExit) as exit_info:
        main(fill(argv))
    assert exit_info.value.code == code
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    assert err.startswith("switchsae "), err
    for word in words:
        assert word in err, err
