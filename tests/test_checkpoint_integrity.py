"""Checkpoints carry a checksum and what they were trained on; eval refuses NaN weights."""
from __future__ import annotations

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from switchsae.checkpoint import CHECKPOINT_FILE, checkpoint_digest, read_checkpoint_meta, saved_activations
from switchsae.config import SAEConfig, TrainConfig
from switchsae.evaluate import evaluate
from switchsae.saes.io import WEIGHTS_FILE, load_sae
from switchsae.sources.activations import TensorSource
from switchsae.train import train

TOPK = SAEConfig(arch="topk", d_model=16, width=64, k=4)
SHORT = TrainConfig(steps=4, batch_size=64, checkpoint_every=2)


@pytest.fixture
def run(tmp_path, acts):
    run_dir = tmp_path / "run"
    train(TOPK, acts, SHORT, run_dir=run_dir, progress=False)
    return run_dir


def test_a_checkpoint_holds_its_checksum_and_its_activations(run, acts):
    meta = read_checkpoint_meta(run / CHECKPOINT_FILE)
    with safe_open(str(run / CHECKPOINT_FILE), framework="pt") as fh:
        tensors = {key: fh.get_tensor(key) for key in fh.keys()}
    assert checkpoint_digest(tensors, meta) == meta["sha256"]
    assert saved_activations(meta) == TensorSource(acts).identity()


def test_a_damaged_checkpoint_is_not_resumed_from(run, acts):
    path = run / CHECKPOINT_FILE
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # one bit of the last tensor
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checkpoint .* fails its checksum: it changed after it was written"):
        train(TOPK, acts, SHORT, run_dir=run, resume=True, progress=False)


def test_resume_on_other_activations_is_refused(run, acts):
    with pytest.raises(ValueError, match="cannot resume .*: it was trained on other activations \\(2,000 x 16 "
                                         "activations .*\\) than these \\(2,000 x 16"):
        train(TOPK, acts + 1, SHORT, run_dir=run, resume=True, progress=False)


def test_resume_on_the_same_activations_continues(tmp_path, acts):
    run_dir = tmp_path / "run"
    train(TOPK, acts, SHORT, run_dir=run_dir, progress=False)
    train(TOPK, acts.clone(), SHORT, run_dir=run_dir, resume=True, progress=False)  # same data, another tensor


def test_a_checkpoint_from_before_checksums_still_resumes(run, acts):
    path = run / CHECKPOINT_FILE
    meta = read_checkpoint_meta(path)
    old = {key: value for key, value in meta.items() if key not in ("sha256", "activations")}
    save_file(load_file(str(path)), str(path), metadata=old)
    train(TOPK, acts + 1, SHORT, run_dir=run, resume=True, progress=False)  # nothing to check against


def test_the_checksum_covers_the_metadata(run):
    meta = read_checkpoint_meta(run / CHECKPOINT_FILE)
    tensors = load_file(str(run / CHECKPOINT_FILE))
    assert checkpoint_digest(tensors, {**meta, "step": "3"}) != meta["sha256"]
    assert checkpoint_digest(tensors, {**meta, "sha256": "x"}) == meta["sha256"]


def test_eval_refuses_nan_weights(run, acts):
    weights = load_file(str(run / WEIGHTS_FILE))
    weights["W_dec"][3, :2] = float("nan")
    weights["b_pre"][0] = float("inf")
    save_file(weights, str(run / WEIGHTS_FILE))
    with pytest.raises(ValueError, match="weights hold NaN or inf values \\(W_dec: 2 of 1,024, b_pre: 1 of 16\\)|"
                                         "weights hold NaN or inf values \\(b_pre: 1 of 16, W_dec: 2 of 1,024\\)"):
        evaluate(load_sae(run), TensorSource(acts).eval_batches(256), progress=False)
