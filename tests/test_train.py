"""The trainer: recipe invariants, schedule, checkpoints, resume and bad input."""
from __future__ import annotations

import dataclasses
import importlib
import json

import pytest
import torch

from switchsae.checkpoint import CHECKPOINT_FILE, load_checkpoint
from switchsae.config import SAEConfig, TrainConfig, default_lr
from switchsae.saes.io import LEGACY_CFG_FILE, LEGACY_WEIGHTS_FILE, load_sae
from switchsae.sources.activations import TensorSource
from switchsae.optim import MOMENT_DTYPES
from switchsae.train import TrainingDiverged, activation_scale, lr_at, optimizer_for, settings_differ, train

SWITCH = SAEConfig(arch="switch", d_model=16, width=64, k=4, n_experts=4)
FAST = TrainConfig(steps=12, batch_size=64, checkpoint_every=4, log_every=2)


def test_default_lr_follows_gao_law():
    assert default_lr(2**14) == pytest.approx(2e-4)
    assert default_lr(2**16) == pytest.approx(1e-4)


def test_lr_schedule_is_flat_then_decays_linearly_to_zero():
    cfg = TrainConfig(steps=100, lr_decay_frac=0.2)
    assert lr_at(0, cfg, 1.0) == lr_at(79, cfg, 1.0) == 1.0
    assert lr_at(80, cfg, 1.0) == pytest.approx(1.0)
    assert lr_at(90, cfg, 1.0) == pytest.approx(0.5)
    assert lr_at(99, cfg, 1.0) == pytest.approx(0.05)


def test_training_lowers_fvu_and_keeps_decoder_unit_norm(acts):
    cfg = TrainConfig(steps=200, batch_size=128, lr=1e-2, log_every=10)
    sae = train(SWITCH, acts, cfg, progress=False)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-5)
    from switchsae.evaluate import evaluate

    before = evaluate(train(SWITCH, acts, TrainConfig(steps=1, batch_size=128, lr=1e-9), progress=False),
                      TensorSource(acts).eval_batches(500), progress=False)
    after = evaluate(sae, TensorSource(acts).eval_batches(500), progress=False)
    assert after["fvu"] < 0.6 * before["fvu"]


def test_init_puts_biases_at_geometric_median_and_encoder_at_decoder(acts):
    sae = train(SWITCH, acts, TrainConfig(steps=1, batch_size=256, lr=1e-12), progress=False)
    assert torch.allclose(sae.W_enc, sae.W_dec, atol=1e-6)
    assert torch.allclose(sae.b_pre, sae.b_router, atol=1e-6)
    assert not torch.allclose(sae.b_pre, torch.zeros(16))


def test_normalize_scales_mean_norm_to_sqrt_d(acts):
    sae = train(SWITCH, acts, TrainConfig(steps=2, batch_size=256, normalize=True), progress=False)
    assert sae.cfg.act_scale == activation_scale(sae_first_batch(acts, 256))
    assert (acts * sae.cfg.act_scale).norm(dim=1).mean().item() == pytest.approx(4.0, rel=0.1)


def sae_first_batch(acts, batch_size):
    return next(TensorSource(acts).train_batches(batch_size, seed=0))


def test_normalized_training_is_invariant_to_activation_scale(acts):
    cfg = TrainConfig(steps=5, batch_size=256, normalize=True)
    small = train(SWITCH, acts, cfg, progress=False)
    large = train(SWITCH, acts * 100, cfg, progress=False)
    assert torch.allclose(small.W_dec, large.W_dec, atol=1e-4)
    assert torch.allclose(large(acts[:50] * 100).x_hat, 100 * small(acts[:50]).x_hat, rtol=1e-3, atol=1e-2)


@pytest.mark.parametrize("arch", ["switch", "topk", "relu", "switch-auxk", "topk-auxk", "switch-bf16moments"])
def test_resume_equals_uninterrupted(tmp_path, acts, arch):
    """Also with AuxK, whose dead-latent counter (on the SAE, saved in the checkpoint) shapes the loss,
    and with bf16 Adam moments, saved as bf16 and stochastically rounded by a hash of the step."""
    arch, _, variant = arch.partition("-")
    cfg = SWITCH if arch == "switch" else SWITCH.replace(arch=arch, n_experts=1)
    if variant == "auxk":
        cfg = cfg.replace(auxk_coeff=1 / 32, auxk_k=4, dead_tokens=64)
    train_cfg = dataclasses.replace(FAST, adam_moments="bf16") if variant == "bf16moments" else FAST
    full = train(cfg, acts, train_cfg, run_dir=tmp_path / "full", progress=False)
    killed = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):  # killed while fetching step 9's batch
        train(cfg, _InterruptedSource(acts, at=9), train_cfg, run_dir=killed, progress=False)
    assert _meta(killed)["step"] == "8"
    assert _tensor(killed, "adam/W_dec/exp_avg_sq").dtype == MOMENT_DTYPES[train_cfg.adam_moments]
    resumed = train(cfg, acts, train_cfg, run_dir=killed, resume=True, progress=False)
    for name, tensor in full.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
    assert _log_without_times(killed) == _log_without_times(tmp_path / "full")


def _log_without_times(run_dir):
    entries = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in e.items() if k != "elapsed_s"} for e in entries]


def _meta(run_dir):
    from safetensors import safe_open

    with safe_open(str(run_dir / CHECKPOINT_FILE), framework="pt") as fh:
        return fh.metadata()


def _tensor(run_dir, name):
    from safetensors import safe_open

    with safe_open(str(run_dir / CHECKPOINT_FILE), framework="pt") as fh:
        return fh.get_tensor(name)


class _InterruptedSource(TensorSource):
    """A source whose stream raises KeyboardInterrupt (:meth:`fail`) when batch ``at`` is requested."""

    def __init__(self, acts, at):
        super().__init__(acts)
        self.at = at

    def train_batches(self, batch_size, seed, start_step=0, **stream):
        for step, batch in enumerate(super().train_batches(batch_size, seed, start_step, **stream), start=start_step):
            yield self.fail(batch) if step == self.at else batch

    def fail(self, batch):
        raise KeyboardInterrupt


def test_auto_matmul_dtype_is_recorded_as_requested_and_a_resume_keeps_the_resolved_one(tmp_path, acts, monkeypatch):
    """The machine's choice can change between a run and its resume (a new torch, a re-measure):
    the resume still uses the dtype the run started with, so it stays exact."""
    train_module = importlib.import_module("switchsae.train")  # the package exports a train() too

    cfg = dataclasses.replace(FAST, matmul_dtype="auto")
    monkeypatch.setattr(train_module, "resolve_matmul_dtype", lambda requested, device: ("bfloat16", "test"))
    full = train(SWITCH, acts, cfg, run_dir=tmp_path / "full", progress=False)
    assert full.matmul_dtype == torch.bfloat16
    with pytest.raises(KeyboardInterrupt):
        train(SWITCH, _InterruptedSource(acts, at=9), cfg, run_dir=tmp_path / "killed", progress=False)
    assert _meta(tmp_path / "killed")["matmul_dtype"] == "bfloat16"
    monkeypatch.setattr(train_module, "resolve_matmul_dtype", lambda requested, device: ("float32", "test"))
    resumed = train(SWITCH, acts, cfg, run_dir=tmp_path / "killed", resume=True, progress=False)
    assert resumed.matmul_dtype == torch.bfloat16
    for name, tensor in full.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
    assert json.loads((tmp_path / "full" / "train_config.json").read_text())["matmul_dtype"] == "auto"


def test_auto_matmul_dtype_measures_nothing_for_architectures_without_a_selection_matmul(acts, monkeypatch):
    train_module = importlib.import_module("switchsae.train")  # the package exports a train() too

    monkeypatch.setattr(train_module, "resolve_matmul_dtype", lambda *args: pytest.fail("resolved for relu"))
    relu = train(SWITCH.replace(arch="relu", n_experts=1), acts, TrainConfig(steps=1, batch_size=64), progress=False)
    assert relu.matmul_dtype == torch.float32


def test_existing_run_is_not_overwritten_without_force(tmp_path, acts):
    train(SWITCH, acts, FAST, run_dir=tmp_path, progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train(SWITCH, acts, FAST, run_dir=tmp_path, progress=False)
    train(SWITCH, acts, FAST, run_dir=tmp_path, force=True, progress=False)
    assert load_sae(tmp_path).cfg.replace(unit_scale=1.0) == SWITCH  # unit_scale: measured on the first batch


def test_a_run_in_the_legacy_layout_counts_as_a_run_and_force_clears_it(tmp_path, acts):
    (tmp_path / LEGACY_CFG_FILE).write_text("{}")
    (tmp_path / LEGACY_WEIGHTS_FILE).write_bytes(b"")
    with pytest.raises(FileExistsError, match="already holds a run"):
        train(SWITCH, acts, FAST, run_dir=tmp_path, progress=False)
    train(SWITCH, acts, FAST, run_dir=tmp_path, force=True, progress=False)
    assert not (tmp_path / LEGACY_CFG_FILE).exists() and not (tmp_path / LEGACY_WEIGHTS_FILE).exists()
    assert load_sae(tmp_path).cfg.replace(unit_scale=1.0) == SWITCH


def test_resume_rejects_changed_settings_and_missing_checkpoint(tmp_path, acts):
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train(SWITCH, acts, FAST, run_dir=tmp_path, resume=True, progress=False)
    train(SWITCH, acts, FAST, run_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        train(SWITCH, acts, TrainConfig(steps=12, batch_size=32), run_dir=tmp_path, resume=True, progress=False)


def test_resume_with_the_other_adam_moments_is_refused(tmp_path, acts):
    bf16 = dataclasses.replace(FAST, adam_moments="bf16")
    train(SWITCH, acts, bf16, run_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"settings differ from the checkpoint in \['adam_moments'\]"):
        train(SWITCH, acts, FAST, run_dir=tmp_path, resume=True, progress=False)
    sae = load_sae(tmp_path)  # the checkpoint itself refuses moments of the other dtype too
    with pytest.raises(ValueError, match=r"moments of W_\w+ are bf16, but this run keeps them fp32 .adam_moments.; "
                                         "resume with adam_moments=bf16"):
        load_checkpoint(tmp_path / CHECKPOINT_FILE, sae, optimizer_for(sae, FAST))
    state = load_checkpoint(tmp_path / CHECKPOINT_FILE, sae, optimizer_for(sae, bf16))
    assert state.step == FAST.steps


def test_an_unknown_adam_moments_setting_is_refused():
    with pytest.raises(ValueError, match="adam_moments must be one of fp32, bf16, got 'fp16'"):
        TrainConfig(adam_moments="fp16")
    for sizes in (dict(shuffle_buffer_mb=0), dict(shuffle_chunk_mb=-1)):
        with pytest.raises(ValueError, match="shuffle_buffer_mb must be a positive number of MiB and shuffle_chunk_mb 0"):
            TrainConfig(**sizes)


def test_a_setting_older_runs_do_not_name_counts_as_its_default():
    """Runs saved before ``lr_width`` existed were trained with its old default, "total" (now
    "expert"), before ``grad_clip`` existed unclipped (now 1), before ``shuffle_chunk_mb`` existed on
    whole shards (now chunks of 16 MiB); runs saved before routing had its own place, with the
    auxiliary weights in the loss's units."""
    saved_sae, saved_train = SWITCH.to_dict(), FAST.to_dict()
    del saved_sae["routing"], saved_train["lr_width"], saved_train["grad_clip"], saved_train["shuffle_chunk_mb"]
    assert settings_differ(saved_sae, saved_train, SWITCH, FAST) == ["aux_units", "grad_clip", "lr_width",
                                                                     "shuffle_chunk_mb", "z_loss_coeff"]
    legacy = SWITCH.replace(routing=SWITCH.routing.__class__(aux_units="loss", z_loss_coeff=0.0))
    old = dataclasses.replace(FAST, lr_width="total", grad_clip=0.0, shuffle_chunk_mb=0)
    assert settings_differ(saved_sae, saved_train, legacy, old) == []
    assert settings_differ(saved_sae, saved_train, legacy, FAST) == ["grad_clip", "lr_width", "shuffle_chunk_mb"]


def test_corrupt_checkpoint_is_named(tmp_path, acts):
    train(SWITCH, acts, FAST, run_dir=tmp_path, progress=False)
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt"):
        train(SWITCH, acts, FAST, run_dir=tmp_path, resume=True, progress=False)


def test_nan_loss_stops_naming_the_terms_and_writes_no_checkpoint_of_diverged_weights(tmp_path, acts):
    """The first update at lr 1e30 makes the loss NaN: the checkpoint after it is never written."""
    exploding = TrainConfig(steps=50, batch_size=64, lr=1e30, checkpoint_every=1)
    with pytest.raises(TrainingDiverged, match=r"diverged at step 1: mse, balance and z_loss not finite .* at lr 1e\+30; "
                                               "no checkpoint was written"):
        train(SWITCH, acts, exploding, run_dir=tmp_path, progress=False)
    assert not (tmp_path / CHECKPOINT_FILE).exists()


class _ExplodingSource(_InterruptedSource):
    """A source whose batch ``at`` is scaled by 1e6 instead (data gone wrong mid-run)."""

    def fail(self, batch):
        return batch * 1e6


def test_an_exploding_loss_stops_naming_the_step_the_term_and_the_intact_checkpoint(tmp_path, acts):
    cfg = TrainConfig(steps=20, batch_size=64, checkpoint_every=3, matmul_dtype="float32")
    with pytest.raises(TrainingDiverged) as info:
        train(SWITCH, _ExplodingSource(acts, at=7), cfg, run_dir=tmp_path, progress=False)
    message = str(info.value)
    assert "diverged at step 7: the loss is" in message and "times its lowest running average" in message
    assert "mostly mse" in message
    assert f"the last checkpoint (step 6) is intact in {tmp_path}" in message
    assert _meta(tmp_path)["step"] == "6"


def test_a_huge_learning_rate_is_stopped_instead_of_saved_as_a_success(tmp_path, acts):
    """At lr 1e6 a TopK SAE's loss stays finite (FVU ~1e12): the growth rule stops it."""
    topk = SWITCH.replace(arch="topk", n_experts=1)
    with pytest.raises(TrainingDiverged, match=r"times its lowest running average.* at lr 1e\+06"):
        train(topk, acts, TrainConfig(steps=30, batch_size=64, lr=1e6), run_dir=tmp_path, progress=False)
    assert not (tmp_path / "sae_weights.safetensors").exists()


@pytest.mark.parametrize("arch", ["switch", "topk", "batchtopk", "relu", "gated", "jumprelu"])
def test_normal_runs_do_not_trip_the_divergence_guard(acts, arch):
    cfg = SWITCH if arch == "switch" else SWITCH.replace(arch=arch, n_experts=1, width=256)
    for lr in (None, 3e-2):
        train(cfg, acts, TrainConfig(steps=40, batch_size=64, lr=lr, checkpoint_every=0), progress=False)


def _snapshot(run_dir):
    return {path.name: path.read_bytes() for path in sorted(run_dir.iterdir()) if path.is_file()}


@pytest.mark.parametrize("failure", ["diverges", "interrupted"])
def test_a_forced_run_that_fails_before_its_first_checkpoint_leaves_the_old_run_intact(tmp_path, acts, failure):
    train(SWITCH, acts, FAST, run_dir=tmp_path, progress=False)
    before = _snapshot(tmp_path)
    if failure == "diverges":
        expected, cfg, source = TrainingDiverged, dataclasses.replace(FAST, lr=1e30), acts
    else:
        expected, cfg, source = KeyboardInterrupt, FAST, _InterruptedSource(acts, at=2)
    with pytest.raises(expected, match="before --force is restored"):
        train(SWITCH, source, cfg, run_dir=tmp_path, force=True, progress=False)
    assert _snapshot(tmp_path) == before
    assert not (tmp_path / ".replaced").exists()


def test_a_forced_run_replaces_the_old_one_once_it_has_a_checkpoint(tmp_path, acts):
    train(SWITCH, acts, FAST, run_dir=tmp_path, progress=False)
    with pytest.raises(KeyboardInterrupt, match=r"the last checkpoint \(step 4\) is intact"):
        train(SWITCH, _InterruptedSource(acts, at=6), FAST, run_dir=tmp_path, force=True, progress=False)
    assert _meta(tmp_path)["step"] == "4"
    assert not (tmp_path / "sae_weights.safetensors").exists(), "the old run's outputs are gone"
    assert not (tmp_path / ".replaced").exists()


def test_a_replaced_run_left_by_a_killed_forced_run_is_restored(tmp_path, acts):
    """As if killed (-9) after moving the old run aside and before its first checkpoint."""
    train(SWITCH, acts, FAST, run_dir=tmp_path, progress=False)
    before = _snapshot(tmp_path)
    (tmp_path / ".replaced").mkdir()
    for name in before:
        if name != "run.lock":
            (tmp_path / name).rename(tmp_path / ".replaced" / name)
    with pytest.raises(FileExistsError, match="already holds a run"):
        train(SWITCH, acts, FAST, run_dir=tmp_path, progress=False)
    assert _snapshot(tmp_path) == before


def test_a_cuda_device_torch_cannot_see_is_refused_before_any_work(monkeypatch, acts):
    from switchsae.train import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    check_device("cuda:0")
    with pytest.raises(ValueError, match="'cuda:1' does not exist: torch sees 1 CUDA GPU"):
        train(SWITCH, _InterruptedSource(acts, at=0), dataclasses.replace(FAST, device="cuda:1"), progress=False)


def test_the_run_folder_is_checked_writable_before_any_step(tmp_path, acts):
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError, match="cannot write to the run folder .*file/run: Not a directory"):
        train(SWITCH, _InterruptedSource(acts, at=0), FAST, run_dir=tmp_path / "file" / "run", progress=False)


def test_iterator_of_batches_is_accepted(acts):
    batches = [acts[i:i + 100] for i in range(0, 1000, 100)]
    sae = train(SWITCH, batches, TrainConfig(steps=10, batch_size=100), progress=False)
    assert sae.W_dec.shape == (64, 16)


@pytest.mark.parametrize("bad", [torch.full((100, 16), float("nan")), torch.zeros(100, 3, 16), torch.zeros(1, 16)])
def test_bad_activation_tensors_are_rejected(bad):
    with pytest.raises(ValueError):
        TensorSource(bad)


def test_sparse_updates_resume_exactly_and_train(tmp_path, acts):
    cfg = TrainConfig(steps=12, batch_size=64, checkpoint_every=4, log_every=2, sparse_updates=True)
    full = train(SWITCH, acts, cfg, run_dir=tmp_path / "full", progress=False)
    with pytest.raises(KeyboardInterrupt):
        train(SWITCH, _InterruptedSource(acts, at=5), cfg, run_dir=tmp_path / "killed", progress=False)
    resumed = train(SWITCH, acts, cfg, run_dir=tmp_path / "killed", resume=True, progress=False)
    for name, tensor in full.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
    assert torch.allclose(full.W_dec.norm(dim=1), torch.ones(64), atol=1e-5)


def test_sparse_updates_are_refused_for_dense_codes(acts):
    with pytest.raises(ValueError, match="sparse code"):
        train(SWITCH.replace(arch="relu", n_experts=1), acts, TrainConfig(steps=1, sparse_updates=True), progress=False)


@pytest.mark.parametrize("lr_width, width", [("total", 64), ("expert", 16)])
def test_default_lr_uses_the_total_or_the_expert_width(tmp_path, acts, lr_width, width):
    train(SWITCH, acts, TrainConfig(steps=1, batch_size=64, log_every=1, lr_width=lr_width), run_dir=tmp_path,
          progress=False)
    assert json.loads((tmp_path / "log.jsonl").read_text())["lr"] == pytest.approx(default_lr(width))


@pytest.mark.parametrize("sparse_updates", [False, True])  # row-sparse gradients are clipped as well
def test_grad_clip_bounds_the_update_only_when_the_norm_exceeds_it(acts, sparse_updates):
    """Clipping at a norm far above the gradient's multiplies it by exactly 1 (weights bit-identical to
    no clipping); at a tiny norm every step is clipped and the weights differ."""
    base = dataclasses.replace(FAST, sparse_updates=sparse_updates, grad_clip=0.0)
    plain = train(SWITCH, acts, base, progress=False).state_dict()
    loose = train(SWITCH, acts, dataclasses.replace(base, grad_clip=1e9), progress=False).state_dict()
    tight = train(SWITCH, acts, dataclasses.replace(base, grad_clip=1e-4, lr_decay_frac=0.0), progress=False)
    for name, tensor in plain.items():
        assert torch.equal(tensor, loose[name]), name
    assert not torch.equal(plain["W_dec"], tight.state_dict()["W_dec"])
    with pytest.raises(ValueError, match="grad_clip"):
        TrainConfig(grad_clip=-1.0)
