"""Data parallel on 2 gloo processes equals one process on the combined batch, for every
architecture: gradients, per-step losses, weights after several steps; and a checkpoint resumes
at another world size. The ``rank_*`` checks run in the workers (spawn_ranks.py), the tests
compare them with the one-process run here."""
from __future__ import annotations

import pytest
import torch
from spawn_ranks import assert_same_logs, run_on_ranks, weights_atol

from switchsae.config import RoutingConfig, SAEConfig, TrainConfig
from switchsae.distributed.data_parallel import average_gradients, shard_batches
from switchsae.distributed.group import LOCAL
from switchsae.sources.activations import TensorSource
from switchsae.sources.synthetic import synthetic_activations
from switchsae.train import _initialise, batch_stream, train

#: fp32 Adam moments, so that ranks and one process agree to rounding (bf16 moments: their own case)
TRAIN = TrainConfig(steps=6, batch_size=64, log_every=1, checkpoint_every=0, matmul_dtype="float32", adam_moments="fp32")
SWITCH = SAEConfig(arch="switch", d_model=16, width=64, k=4, n_experts=4)
CASES = {
    "switch": (SWITCH, TRAIN),
    "switch-normalized": (SWITCH, TRAIN.__class__(**{**TRAIN.to_dict(), "normalize": True})),
    "switch-auxk": (SWITCH.replace(auxk_coeff=1 / 32, auxk_k=4, dead_tokens=64), TRAIN),
    "switch-bf16-moments": (SWITCH, TrainConfig(**{**TRAIN.to_dict(), "adam_moments": "bf16", "lr": 1e-3})),
    "switch-expert-choice": (SWITCH.replace(routing=RoutingConfig(router="expert_choice")), TRAIN),
    "switch-sinkhorn": (SWITCH.replace(routing=RoutingConfig(router="sinkhorn")), TRAIN),
    "switch-top-e-shared": (SWITCH.replace(width=80, routing=RoutingConfig(router="top_e", experts_per_token=2,
                                                                          shared_expert=True)), TRAIN),
    "topk": (SWITCH.replace(arch="topk", n_experts=1), TRAIN),
    "topk-sparse": (SWITCH.replace(arch="topk", n_experts=1), TrainConfig(**{**TRAIN.to_dict(), "sparse_updates": True})),
    "topk-sparse-clipped": (SWITCH.replace(arch="topk", n_experts=1),
                            TrainConfig(**{**TRAIN.to_dict(), "sparse_updates": True, "grad_clip": 1e-3})),
    "batchtopk": (SWITCH.replace(arch="batchtopk", n_experts=1), TRAIN),
    "relu": (SWITCH.replace(arch="relu", n_experts=1), TRAIN),
    "gated": (SWITCH.replace(arch="gated", n_experts=1), TRAIN),
    "jumprelu": (SWITCH.replace(arch="jumprelu", n_experts=1, jump_bandwidth=0.1), TRAIN),
}
RESUME = (SWITCH, TrainConfig(steps=8, batch_size=64, log_every=1, checkpoint_every=4, matmul_dtype="float32",
                              adam_moments="fp32"))


def acts() -> torch.Tensor:
    return synthetic_activations(2000, 16, n_features=64, active=3, seed=0)


def fresh(case: str):
    """The SAE a run of ``case`` starts from (seeded, initialised on the first batch), and that batch."""
    sae_cfg, cfg = CASES[case]
    sae = _initialise(sae_cfg, cfg, batch_stream(acts(), cfg, 0))
    sae.sparse_grads = cfg.sparse_updates
    sae.tokens_since_fired = torch.zeros(sae.cfg.width, dtype=torch.long)
    return sae, next(batch_stream(acts(), cfg, 0))


def gradients(sae) -> dict[str, torch.Tensor]:
    return {name: (p.grad.to_dense() if p.grad.is_sparse else p.grad).clone() for name, p in sae.named_parameters()
            if p.grad is not None}


class Interrupted(TensorSource):
    """A source whose stream raises KeyboardInterrupt when batch ``at`` is requested (a killed run)."""

    def __init__(self, data, at):
        super().__init__(data)
        self.at = at

    def train_batches(self, batch_size, seed, start_step=0, **stream):
        for step, batch in enumerate(super().train_batches(batch_size, seed, start_step, **stream), start=start_step):
            if step == self.at:
                raise KeyboardInterrupt
            yield batch


# -- run in the workers ------------------------------------------------------------------------
def rank_gradients(ranks) -> dict:
    out = {}
    for case in CASES:
        sae, batch = fresh(case)
        world = ranks.world()
        world.prepare(sae, broadcast=True)
        x = next(shard_batches([batch], ranks.rank, ranks.size))
        losses = sae.loss(x, sae(x))
        losses["loss"].backward()
        world.reduce_gradients(sae)
        out[case] = {"grads": gradients(sae), "loss": world.mean(losses)["loss"]}
    return out


def rank_train(ranks) -> dict:
    out = {}
    for case, (sae_cfg, cfg) in CASES.items():
        sae = train(sae_cfg, acts(), cfg, run_dir=ranks.shared / "train" / case, world=ranks.world(), progress=False)
        out[case] = {name: t.clone() for name, t in sae.state_dict().items()}
    return out


def rank_resume_across_world_sizes(ranks) -> dict:
    """2 ranks killed after the step-4 checkpoint (the test resumes alone); one process killed
    likewise, then resumed by 2 ranks."""
    sae_cfg, cfg = RESUME
    with pytest.raises(KeyboardInterrupt):
        train(sae_cfg, Interrupted(acts(), at=5), cfg, run_dir=ranks.shared / "2to1", world=ranks.world(),
              progress=False)
    if ranks.rank == 0:
        with pytest.raises(KeyboardInterrupt):
            train(sae_cfg, Interrupted(acts(), at=5), cfg, run_dir=ranks.shared / "1to2", progress=False)
    ranks.barrier()
    sae = train(sae_cfg, acts(), cfg, run_dir=ranks.shared / "1to2", resume=True, world=ranks.world(), progress=False)
    return {name: t.clone() for name, t in sae.state_dict().items()}


# -- the tests -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    shared = tmp_path_factory.mktemp("data_parallel")
    return run_on_ranks(__file__, shared), shared


@pytest.mark.parametrize("case", CASES)
def test_gradients_of_two_ranks_equal_one_process_on_the_combined_batch(ranks, case):
    results, _ = ranks
    sae, x = fresh(case)
    losses = sae.loss(x, sae(x))
    losses["loss"].backward()
    expected = gradients(sae)
    for rank, got in enumerate(results("rank_gradients")):
        assert got[case]["grads"].keys() == expected.keys()
        torch.testing.assert_close(got[case]["loss"], losses["loss"].detach(), rtol=1e-5, atol=1e-6)
        for name, grad in expected.items():
            torch.testing.assert_close(got[case]["grads"][name], grad, rtol=1e-4, atol=1e-6,
                                       msg=lambda m, n=name, r=rank: f"rank {r}, {n}: {m}")


@pytest.mark.parametrize("case", CASES)
def test_training_on_two_ranks_equals_one_process(ranks, case, tmp_path):
    results, shared = ranks
    sae_cfg, cfg = CASES[case]
    sae = train(sae_cfg, acts(), cfg, run_dir=tmp_path, progress=False)
    atol = weights_atol(cfg)
    for rank, weights in enumerate(results("rank_train")):
        for name, tensor in sae.state_dict().items():
            torch.testing.assert_close(weights[case][name], tensor, rtol=1e-4, atol=atol,
                                       msg=lambda m, n=name, r=rank: f"rank {r}, {n}: {m}")
    assert_same_logs(shared / "train" / case, tmp_path)


def test_a_checkpoint_resumes_at_another_world_size(ranks, tmp_path):
    results, shared = ranks
    sae_cfg, cfg = RESUME
    full = train(sae_cfg, acts(), cfg, run_dir=tmp_path, progress=False).state_dict()
    alone = train(sae_cfg, acts(), cfg, run_dir=shared / "2to1", resume=True, progress=False).state_dict()
    for name, tensor in full.items():
        torch.testing.assert_close(alone[name], tensor, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"2 -> 1, {n}: {m}")
        for rank, weights in enumerate(results("rank_resume_across_world_sizes")):
            torch.testing.assert_close(weights[name], tensor, rtol=1e-4, atol=1e-5,
                                       msg=lambda m, n=name, r=rank: f"1 -> 2, rank {r}, {n}: {m}")
    assert_same_logs(shared / "2to1", tmp_path)




# -- no processes needed -----------------------------------------------------------------------------
def test_rank_shards_are_slices_of_the_one_process_batch_and_cover_it():
    batches = [torch.arange(24.0).view(8, 3), (torch.ones(8, 3), torch.arange(8))]
    shards = [list(shard_batches(batches, rank, 4)) for rank in range(4)]
    torch.testing.assert_close(torch.cat([s[0] for s in shards]), batches[0])
    assert torch.equal(torch.cat([s[1][1] for s in shards]), torch.arange(8))
    with pytest.raises(ValueError, match="does not split into 3 equal shards"):
        next(shard_batches(batches, 0, 3))


def test_gradient_averaging_alone_leaves_gradients_as_they_are():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    average_gradients([p], LOCAL, 1)
    assert torch.equal(p.grad, torch.full((3,), 2.0))
