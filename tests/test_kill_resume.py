"""kill -9 at random moments of a real `switchsae train` process, then `--resume`: the finished
SAE must equal, bit for bit, the one an uninterrupted run trains (20 trials; Switch and TopK)."""
from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from switchsae.checkpoint import CHECKPOINT_FILE
from switchsae.saes.io import WEIGHTS_FILE
from switchsae.sources.synthetic import synthetic_activations

TRIALS = 20
STEPS = 60
SHAPES = {
    "topk": ["--arch", "topk", "--width", "256", "--k", "8"],
    "switch": ["--arch", "switch", "--width", "512", "--n-experts", "4", "--k", "8", "--sparse-updates"],
}


def train_command(acts: Path, out: Path, arch: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "switchsae", "train", "--acts", str(acts), "--out", str(out), *SHAPES[arch],
            "--steps", str(STEPS), "--batch-size", "128", "--checkpoint-every", "1", "--quiet", *extra]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / WEIGHTS_FILE))


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(SHAPES))
def test_kill_9_at_random_steps_then_resume_is_bit_identical(tmp_path, arch):
    acts = tmp_path / "acts.safetensors"
    save_file({"activations": synthetic_activations(8192, 32, 256, 4, seed=0)}, str(acts))
    reference = tmp_path / "reference"
    started = time.perf_counter()
    subprocess.run(train_command(acts, reference, arch), check=True, capture_output=True)
    full_run_s = time.perf_counter() - started
    expected = weights(reference)
    rng = random.Random(0)
    killed_mid_run = 0
    for trial in range(TRIALS // len(SHAPES)):
        run = tmp_path / f"trial{trial}"
        process = subprocess.Popen(train_command(acts, run, arch), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.15, 0.75) * full_run_s)
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            killed_mid_run += 1
        process.wait()
        resume = ["--resume"] if (run / CHECKPOINT_FILE).exists() else ["--force"]
        done = subprocess.run(train_command(acts, run, arch, *resume), capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        got = weights(run)
        assert got.keys() == expected.keys()
        for name, value in expected.items():
            assert torch.equal(got[name], value), f"trial {trial}: {name} differs after kill -9 and resume"
    # the machine's load changes the run's length between trials; most kills land mid-run
    assert killed_mid_run >= 3, f"only {killed_mid_run} kills landed while the run was training"
