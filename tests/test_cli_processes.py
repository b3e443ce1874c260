"""The command line across real processes: one trainer per run folder, and Ctrl-C keeping the
last checkpoint (one ``switchsae train`` subprocess, ~3 s of it importing torch)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from switchsae.checkpoint import CHECKPOINT_FILE
from switchsae.cli import main
from switchsae.sources.synthetic import synthetic_activations

REPO = Path(__file__).resolve().parents[1]


def _wait_for(path: Path, process: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert process.poll() is None, f"the trainer exited early: {process.communicate()[1]}"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


def _sigint_as_in_a_terminal() -> None:
    """A program started in the background by a non-interactive shell (``cmd &``, as a CI log
    redirect may be) inherits SIGINT as ignored, and so would the trainer: it would never see the
    Ctrl-C this test sends. A trainer in a terminal's foreground has SIGINT at its default."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_a_second_trainer_into_a_busy_folder_is_refused_and_ctrl_c_keeps_the_checkpoint(tmp_path, capsys):
    acts = tmp_path / "acts.safetensors"
    save_file({"activations": synthetic_activations(2000, 16, 64, 3, seed=0)}, str(acts))
    out = tmp_path / "run"
    argv = ["train", "--acts", str(acts), "--out", str(out), "--arch", "topk", "--width", "32", "--k", "4",
            "--batch-size", "64", "--matmul-dtype", "float32", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    first = subprocess.Popen([sys.executable, "-X", "faulthandler", "-m", "switchsae.cli", *argv, "--steps", "10000000",
                              "--checkpoint-every", "5"], env=env, stderr=subprocess.PIPE, text=True,
                             preexec_fn=_sigint_as_in_a_terminal)
    try:
        _wait_for(out / CHECKPOINT_FILE, first)
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--steps", "10", "--force"])
        assert exit_info.value.code == 2
        assert "is in use by another switchsae process" in capsys.readouterr().err
        first.send_signal(signal.SIGINT)
        try:
            _, err = first.communicate(timeout=60)
        except subprocess.TimeoutExpired:  # faulthandler prints every thread's stack on SIGABRT
            first.send_signal(signal.SIGABRT)
            pytest.fail(f"the trainer did not stop within 60 s of SIGINT; its threads:\n{first.communicate(timeout=30)[1]}")
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 130, err
    with safe_open(str(out / CHECKPOINT_FILE), framework="pt") as fh:
        step = fh.metadata()["step"]
    assert err.strip().splitlines()[-1] == (f"switchsae train: interrupted; the last checkpoint (step {step}) "
                                            f"is intact in {out}")
