"""``switchsae train`` as the ranks of a distributed run: processes started the way torchrun
starts them (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the environment), a rank killed mid-training,
bad input printed once; and (slow) ``--nproc`` through torchrun itself, data parallel and on a
2 x 2 mesh, equal to one process."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from switchsae.checkpoint import CHECKPOINT_FILE, load_checkpoint, read_checkpoint_meta
from switchsae.config import SAEConfig, TrainConfig
from switchsae.saes import build_sae
from switchsae.saes.io import load_sae
from switchsae.sources.synthetic import synthetic_activations
from switchsae.train import optimizer_for

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
SWITCH = ["--arch", "switch", "--width", "64", "--k", "4", "--experts", "4", "--batch-size", "64",
          "--matmul-dtype", "float32", "--quiet"]


@pytest.fixture
def acts_file(tmp_path) -> Path:
    path = tmp_path / "acts.safetensors"
    save_file({"activations": synthetic_activations(2000, 16, n_features=64, active=3, seed=0)}, str(path))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(args: list[str], size: int = 2) -> list[subprocess.Popen]:
    """``size`` processes of ``python -m switchsae train ARGS`` with torchrun's environment."""
    port = free_port()
    return [subprocess.Popen([sys.executable, "-m", "switchsae", "train", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env={**ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(size),
                                  "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
            for rank in range(size)]


def test_a_killed_rank_stops_the_other_with_one_line_and_the_checkpoint_is_intact(tmp_path, acts_file):
    out = tmp_path / "run"
    ranks = start_ranks(["--acts", str(acts_file), "--out", str(out), *SWITCH, "--steps", "100000",
                         "--checkpoint-every", "20", "--log-every", "1000", "--dist-timeout", "20"])
    try:
        deadline = time.monotonic() + 120
        while not (out / CHECKPOINT_FILE).exists():
            assert time.monotonic() < deadline and ranks[0].poll() is None, ranks[0].communicate()
            time.sleep(0.2)
        ranks[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        _, stderr = ranks[0].communicate(timeout=60)
    finally:
        for rank in ranks:
            rank.kill()
    assert time.monotonic() - killed < 20
    assert ranks[0].returncode == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("switchsae train: error: rank 0 lost contact with the other ranks")
    step = read_checkpoint_meta(out / CHECKPOINT_FILE)["step"]
    assert f"the last checkpoint (step {step}) is intact" in lines[0]
    meta = read_checkpoint_meta(out / CHECKPOINT_FILE)
    sae = build_sae(SAEConfig.from_dict(json.loads(meta["sae_cfg"])))
    assert load_checkpoint(out / CHECKPOINT_FILE, sae, optimizer_for(sae, TrainConfig())).step == int(step)


def test_bad_input_to_every_rank_is_printed_once(tmp_path, acts_file):
    ranks = start_ranks(["--acts", str(acts_file), "--out", str(tmp_path / "run"), *SWITCH, "--steps", "4",
                         "--expert-parallel", "2", "--experts", "3", "--width", "48"])
    outputs = [rank.communicate(timeout=120) for rank in ranks]
    assert [rank.returncode for rank in ranks] == [2, 2]
    assert outputs[0][1].strip() == ("switchsae train: error: the 3 experts do not split evenly across 2 "
                                     "expert-parallel ranks (choose an --expert-parallel size that divides 3)")
    assert outputs[1][1].strip() == ""


def test_expert_parallel_needs_several_processes(tmp_path, acts_file):
    done = subprocess.run([sys.executable, "-m", "switchsae", "train", "--acts", str(acts_file), "--out",
                           str(tmp_path / "run"), *SWITCH, "--steps", "2", "--expert-parallel", "2"],
                          env=ENV, capture_output=True, text=True)
    assert done.returncode == 2
    assert "--expert-parallel 2 needs at least 2 processes: add --nproc N or start the command with torchrun" in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("layout, routing", [
    (["--nproc", "2"], []), (["--nproc", "4", "--expert-parallel", "2"], []),
    (["--nproc", "4", "--expert-parallel", "2"],
     ["--width", "80", "--router", "top_e", "--experts-per-token", "2", "--shared-expert", "--auxk-coeff", "0.5",
      "--dead-tokens", "64"]),
], ids=["data-parallel-2", "mesh-2x2", "mesh-2x2-top2-shared-auxk"])
def test_nproc_through_torchrun_trains_what_one_process_trains(tmp_path, acts_file, layout, routing):
    args = [*SWITCH, *routing, "--steps", "6", "--checkpoint-every", "3", "--log-every", "1", "--lr", "0.01"]
    alone = subprocess.run([sys.executable, "-m", "switchsae", "train", "--acts", str(acts_file), "--out",
                            str(tmp_path / "alone"), *args], env=ENV, capture_output=True, text=True)
    assert alone.returncode == 0, alone.stderr
    launched = subprocess.run([sys.executable, "-m", "switchsae", "train", "--acts", str(acts_file), "--out",
                               str(tmp_path / "launched"), *args, *layout], env=ENV, capture_output=True, text=True,
                              timeout=600)
    assert launched.returncode == 0, launched.stderr
    assert launched.stdout.count("saved switch SAE") == 1
    expected, got = load_sae(tmp_path / "alone"), load_sae(tmp_path / "launched")
    for name, tensor in expected.state_dict().items():
        torch.testing.assert_close(got.state_dict()[name], tensor, rtol=1e-4, atol=1e-5)
    failed = subprocess.run([sys.executable, "-m", "switchsae", "train", "--acts", str(acts_file), "--out",
                             str(tmp_path / "launched"), *args, *layout], env=ENV, capture_output=True, text=True,
                            timeout=600)
    assert failed.returncode == 2
    assert failed.stderr.strip().splitlines()[-1].startswith("switchsae train: error:")
    assert "already holds a run" in failed.stderr
