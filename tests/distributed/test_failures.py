"""Bad input to a distributed run stops every rank at the start with one message (from rank 0),
never a hang: settings that differ across ranks, experts that do not split, a router expert
parallelism cannot run, a resume with another architecture, a failure on one rank alone; and a
rank that stalls mid-step stops the others within the process-group timeout, the last
checkpoint intact. The ``rank_*`` checks run in the workers (spawn_ranks.py)."""
from __future__ import annotations

import os
import time

import pytest
from spawn_ranks import run_on_ranks

from switchsae.checkpoint import CHECKPOINT_FILE, read_checkpoint_meta
from switchsae.config import SAEConfig, TrainConfig
from switchsae.sources.activations import TensorSource
from switchsae.sources.synthetic import synthetic_activations
from switchsae.train import train

SWITCH = SAEConfig(arch="switch", d_model=16, width=64, k=4, n_experts=4)
TRAIN = TrainConfig(steps=4, batch_size=64, log_every=2, checkpoint_every=2, matmul_dtype="float32")
TIMEOUT_S = 8.0  # the workers' process-group timeout


def acts():
    return synthetic_activations(1000, 16, n_features=64, active=3, seed=0)


def refusal(ranks, run) -> dict:
    """What ``run()`` raised on this rank: its type, message and whether another rank reports it."""
    with pytest.raises(Exception) as caught:
        run()
    return {"type": type(caught.value).__name__, "message": str(caught.value),
            "reported_elsewhere": getattr(caught.value, "reported_elsewhere", False)}


class Stalls(TensorSource):
    """On rank 1, the stream stops answering at batch ``at`` (for twice the timeout, then the
    process dies); on other ranks it is a plain source."""

    def __init__(self, data, rank, at):
        super().__init__(data)
        self.rank, self.at = rank, at

    def train_batches(self, batch_size, seed, start_step=0, **stream):
        for step, batch in enumerate(super().train_batches(batch_size, seed, start_step, **stream), start=start_step):
            if self.rank == 1 and step == self.at:
                time.sleep(2 * TIMEOUT_S)
                os._exit(1)
            yield batch


# -- run in the workers ------------------------------------------------------------------------
def rank_settings_that_differ(ranks) -> dict:
    cfg = TrainConfig(**{**TRAIN.to_dict(), "lr": 1e-3 * (1 + ranks.rank)})
    return refusal(ranks, lambda: train(SWITCH, acts(), cfg, world=ranks.world(), progress=False))


def rank_experts_that_do_not_split(ranks) -> dict:
    sae_cfg = SWITCH.replace(width=48, n_experts=3)
    return refusal(ranks, lambda: train(sae_cfg, acts(), TRAIN, world=ranks.world(expert_parallel=2), progress=False))


def rank_an_sae_without_experts_for_expert_parallelism(ranks) -> dict:
    sae_cfg = SWITCH.replace(arch="topk", n_experts=1)
    return refusal(ranks, lambda: train(sae_cfg, acts(), TRAIN, world=ranks.world(expert_parallel=2), progress=False))


def rank_a_batch_that_does_not_split(ranks) -> dict:
    cfg = TrainConfig(**{**TRAIN.to_dict(), "batch_size": 63})
    return refusal(ranks, lambda: train(SWITCH, acts(), cfg, world=ranks.world(), progress=False))


def rank_resume_with_another_architecture(ranks) -> dict:
    run_dir = ranks.shared / "switch-run"
    train(SWITCH, acts(), TRAIN, run_dir=run_dir, world=ranks.world(expert_parallel=2), progress=False)
    topk = SWITCH.replace(arch="topk", n_experts=1)
    return refusal(ranks, lambda: train(topk, acts(), TRAIN, run_dir=run_dir, resume=True, world=ranks.world(),
                                        progress=False))


def rank_a_failure_on_rank_0_alone(ranks) -> dict:
    """Rank 0 finds a run in the folder (no --force); rank 1 is told, and neither trains."""
    run_dir = ranks.shared / "taken"
    if ranks.rank == 0:
        train(SWITCH, acts(), TRAIN, run_dir=run_dir, progress=False)
    ranks.barrier()
    return refusal(ranks, lambda: train(SWITCH, acts(), TRAIN, run_dir=run_dir, world=ranks.world(), progress=False))


def rank_a_rank_that_stalls(ranks) -> dict:
    """Last: rank 1 never comes back from fetching step 3's batch."""
    run_dir = ranks.shared / "stalled"
    cfg = TrainConfig(**{**TRAIN.to_dict(), "steps": 8})
    started = time.monotonic()
    result = refusal(ranks, lambda: train(SWITCH, Stalls(acts(), ranks.rank, at=3), cfg, run_dir=run_dir,
                                          world=ranks.world(), progress=False))
    return {**result, "seconds": time.monotonic() - started}


# -- the tests -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def results(tmp_path_factory):
    shared = tmp_path_factory.mktemp("failures")
    return run_on_ranks(__file__, shared, timeout_s=TIMEOUT_S), shared


def assert_refused_everywhere(results, check, error, *words):
    """Every rank raised ``error`` mentioning ``words``; only rank 0 reports it."""
    for rank, got in enumerate(results(check)):
        assert got["type"] == error, got
        assert "\n" not in got["message"] and all(word in got["message"] for word in words), got["message"]
        assert got["reported_elsewhere"] == (rank != 0)


def test_settings_that_differ_across_ranks_stop_every_rank_naming_them(results):
    assert_refused_everywhere(results[0], "rank_settings_that_differ", "ValueError",
                              "different settings", "rank 1 differs from rank 0 in ['train.lr']")


def test_experts_that_do_not_split_across_the_expert_parallel_ranks_are_refused(results):
    assert_refused_everywhere(results[0], "rank_experts_that_do_not_split", "ValueError",
                              "the 3 experts do not split evenly across 2 expert-parallel ranks")


def test_an_sae_without_experts_is_refused_for_expert_parallelism(results):
    assert_refused_everywhere(results[0], "rank_an_sae_without_experts_for_expert_parallelism", "ValueError",
                              "splits a Switch SAE's experts; --arch topk has none")


def test_a_batch_that_does_not_split_across_the_ranks_is_refused(results):
    assert_refused_everywhere(results[0], "rank_a_batch_that_does_not_split", "ValueError",
                              "--batch-size 63 does not split evenly across the 2 ranks")


def test_a_distributed_checkpoint_resumed_with_another_architecture_is_refused(results):
    assert_refused_everywhere(results[0], "rank_resume_with_another_architecture", "ValueError",
                              "cannot resume", "settings differ from the checkpoint in ['arch'")


def test_a_failure_on_one_rank_stops_the_others_with_its_message(results):
    rank0, rank1 = results[0]("rank_a_failure_on_rank_0_alone")
    assert rank0["type"] == "FileExistsError" and "already holds a run" in rank0["message"]
    assert not rank0["reported_elsewhere"]
    assert rank1["type"] == "DistributedError" and rank1["reported_elsewhere"]
    assert "rank 0 failed: FileExistsError" in rank1["message"] and "already holds a run" in rank1["message"]


def test_a_rank_that_stalls_stops_the_others_within_the_timeout_and_the_checkpoint_survives(results):
    checks, shared = results
    got = checks.by_rank[0]["rank_a_rank_that_stalls"]
    assert got[0] == "ok", got[1]
    got = got[1]
    assert got["type"] == "DistributedError", got
    assert "lost contact with the other ranks" in got["message"] and "\n" not in got["message"]
    assert "the last checkpoint (step 2) is intact" in got["message"]
    assert TIMEOUT_S <= got["seconds"] < TIMEOUT_S + 10
    assert read_checkpoint_meta(shared / "stalled" / CHECKPOINT_FILE)["step"] == "2"
    resumed = train(SWITCH, acts(), TrainConfig(**{**TRAIN.to_dict(), "steps": 8}), run_dir=shared / "stalled",
                    resume=True, progress=False)
    assert resumed.W_dec.shape == (64, 16)
