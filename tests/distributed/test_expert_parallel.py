"""Expert parallel on 2 gloo processes equals the one-process Switch SAE: outputs, losses, every
gradient and the weights after an optimizer step, also when one rank receives no tokens; training
runs, the capacity factor, and checkpoints that resume at another world size. The ``rank_*``
checks run in the workers (spawn_ranks.py), the tests compare them with one process here."""
from __future__ import annotations

import json
import os
from contextlib import contextmanager

import pytest
import torch
from spawn_ranks import assert_same_logs, run_on_ranks, weights_atol

from switchsae.config import RoutingConfig, SAEConfig, TrainConfig
from switchsae.distributed.data_parallel import shard_batches
from switchsae.sources.activations import TensorSource
from switchsae.sources.synthetic import synthetic_activations
from switchsae.train import _initialise, batch_stream, optimizer_for, train

SWITCH = SAEConfig(arch="switch", d_model=16, width=64, k=4, n_experts=4)
SHARED = SWITCH.replace(width=80, routing=RoutingConfig(shared_expert=True))  # 4 routed experts + the shared one
TOP2 = SWITCH.replace(routing=RoutingConfig(router="top_e", experts_per_token=2))
CHOICE = SWITCH.replace(routing=RoutingConfig(router="expert_choice"))
AUXK = {"auxk_coeff": 0.5, "dead_tokens": 32}
TRAIN = TrainConfig(steps=6, batch_size=64, log_every=1, checkpoint_every=0, matmul_dtype="float32", lr=1e-2)
SPARSE = TrainConfig(**{**TRAIN.to_dict(), "sparse_updates": True})
CASES = {  # name: (SAE config, train config, setup: "skewed" routes every token to expert 0, "dead" kills latents)
    "top1": (SWITCH, TRAIN, ""),
    "top1-normalized": (SWITCH, TrainConfig(**{**TRAIN.to_dict(), "normalize": True}), ""),
    "skewed": (SWITCH, TRAIN, "skewed"),
    "sparse-updates": (SWITCH, SPARSE, ""),
    "bf16-selection": (SWITCH, TrainConfig(**{**TRAIN.to_dict(), "matmul_dtype": "bfloat16"}), ""),
    # bf16 Adam moments: sliced per rank, gathered (bf16) into the checkpoint
    "bf16-moments": (SWITCH, TrainConfig(**{**TRAIN.to_dict(), "adam_moments": "bf16"}), ""),
    # the gradient's norm clipped over the whole SAE: routed rows summed over the ranks, shared ones once
    "clipped": (SWITCH, TrainConfig(**{**TRAIN.to_dict(), "grad_clip": 1e-3}), ""),
    "clipped-shared-sparse": (SHARED, TrainConfig(**{**SPARSE.to_dict(), "grad_clip": 1e-3}), ""),
    "sinkhorn": (SWITCH.replace(routing=RoutingConfig(router="sinkhorn")), TRAIN, ""),
    "hash": (SWITCH.replace(routing=RoutingConfig(router="hash")), TRAIN, ""),
    "z-loss": (SWITCH.replace(routing=RoutingConfig(z_loss_coeff=0.1)), TRAIN, ""),
    # several entries per token: the TopK over a token's experts is taken at its home
    "top2": (TOP2, TRAIN, ""),
    "top2-skewed": (TOP2, TRAIN, "skewed"),  # experts 0 and 1 both on rank 0
    "top2-sparse": (TOP2, SPARSE, ""),
    "shared": (SHARED, TRAIN, ""),
    "shared-sparse-skewed": (SHARED, SPARSE, "skewed"),
    "hash-shared": (SHARED.replace(routing=RoutingConfig(router="hash", shared_expert=True)), TRAIN, ""),
    "expert-choice": (CHOICE, TRAIN, ""),
    "expert-choice-sparse": (CHOICE.replace(routing=RoutingConfig(router="expert_choice", capacity_factor=0.5)),
                             SPARSE, ""),
    # AuxK on the experts' owners: dead counters for every latent, the same on every rank
    "auxk": (SWITCH.replace(**AUXK), TRAIN, "dead"),
    "auxk-k8-skewed": (SWITCH.replace(**AUXK, auxk_k=8), TRAIN, "skewed dead"),
    "auxk-top2-sparse": (TOP2.replace(**AUXK, auxk_k=8), SPARSE, "dead"),
    "auxk-shared": (SHARED.replace(**AUXK), SPARSE, "dead"),
    # the plain-torch kernels, the ops a GPU runs (no compiled CPU kernels)
    "top2-torch-ops": (TOP2, SPARSE, "torch-ops"),
    "auxk-shared-torch-ops": (SHARED.replace(**AUXK), TRAIN, "dead torch-ops"),
}
TRAINED = ("top1", "top1-normalized", "sparse-updates", "bf16-moments", "clipped", "clipped-shared-sparse",
           "top2-sparse", "shared", "expert-choice-sparse", "auxk-top2-sparse")
RESUME = TrainConfig(steps=8, batch_size=64, log_every=1, checkpoint_every=4, matmul_dtype="float32", lr=1e-2)
#: every routing novelty at once, for the resume test: top-2, a shared expert, AuxK
MIXED = SHARED.replace(routing=RoutingConfig(router="top_e", experts_per_token=2, shared_expert=True), **AUXK)
RESUMED = {"top1": SWITCH, "top2-shared-auxk": MIXED}
LATENTS = [slice(0, 32), slice(32, 64)]  # each rank's expert rows


@contextmanager
def kernels(case: str):
    """With the plain-torch kernels where ``case`` asks for them (kernels/native.py reads the switch
    at every call)."""
    before = os.environ.get("SWITCHSAE_NATIVE")
    if "torch-ops" in CASES[case][2]:
        os.environ["SWITCHSAE_NATIVE"] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("SWITCHSAE_NATIVE", None)
        else:
            os.environ["SWITCHSAE_NATIVE"] = before


def acts() -> torch.Tensor:
    return synthetic_activations(2000, 16, n_features=64, active=3, seed=0)


def fresh(case: str):
    """The SAE of ``case`` initialised on the first batch, that batch, and token ids for it."""
    sae_cfg, cfg, setup = CASES[case]
    sae = _initialise(sae_cfg, cfg, batch_stream(acts(), cfg, 0))
    sae.matmul_dtype = getattr(torch, cfg.matmul_dtype)
    sae.sparse_grads = cfg.sparse_updates
    if "skewed" in setup:  # equal logits: every token to expert 0 (top-2: 0 and 1), so rank 1 receives none
        with torch.no_grad():
            sae.W_router.zero_()
    if "dead" in setup:  # every third latent dead, latent 0 alive (so only padding puts it in a gradient)
        sae.tokens_since_fired = torch.where(torch.arange(sae_cfg.width) % 3 == 1, sae_cfg.dead_tokens, 0)
    return sae, next(batch_stream(acts(), cfg, 0)), torch.arange(64) * 7 % 50


def step(sae, x, ids, cfg) -> dict:
    """Forward, backward and one optimizer step; what the comparison needs, in token order."""
    out = sae(x, token_ids=ids)
    losses = sae.loss(x, out)
    losses["loss"].backward()
    return {"x_hat": out.x_hat.detach(), "code": sorted_code(out.latents), "losses": losses, "out": out}


def sorted_code(latents) -> tuple[torch.Tensor, torch.Tensor]:
    """A code with each token's latents in index order (the order within a token is free)."""
    indices, order = latents.indices.sort(dim=1)
    return latents.values.detach().gather(1, order), indices


def dense_grads(sae) -> dict[str, torch.Tensor]:
    """Every gradient as a dense tensor and, for a row-sparse one, which rows it holds (``NAME rows``:
    a row holding zeros still moves under LazyAdam once it has moments, so the rows must agree too)."""
    grads = {}
    for name, p in sae.named_parameters():
        if p.grad is not None:
            grads[name] = (p.grad.to_dense() if p.grad.is_sparse else p.grad).clone()
            if p.grad.is_sparse:
                grads[f"{name} rows"] = torch.zeros(p.shape[0]).index_fill_(0, p.grad.coalesce()._indices()[0], 1)
    return grads


def optimizer_step(sae, cfg) -> dict[str, torch.Tensor]:
    opt = optimizer_for(sae, cfg)
    for group in opt.param_groups:
        group["lr"] = 1e-2
    opt.step()
    return {name: t.detach().clone() for name, t in sae.state_dict().items()}


class Interrupted(TensorSource):
    """A source whose stream raises KeyboardInterrupt when batch ``at`` is requested (a killed run)."""

    def __init__(self, data, at):
        super().__init__(data)
        self.at = at

    def train_batches(self, batch_size, seed, start_step=0, **stream):
        for index, batch in enumerate(super().train_batches(batch_size, seed, start_step, **stream), start=start_step):
            if index == self.at:
                raise KeyboardInterrupt
            yield batch


# -- run in the workers ------------------------------------------------------------------------
def rank_forward_backward_and_step(ranks) -> dict:
    results = {}
    for case, (_, cfg, _) in CASES.items():
        with kernels(case):
            sae, x, ids = fresh(case)
            world = ranks.world(expert_parallel=2)
            world.prepare(sae, broadcast=True)
            x, ids = next(shard_batches([(x, ids)], ranks.rank, ranks.size))
            got = step(sae, x, ids, cfg)
            world.reduce_gradients(sae)
            results[case] = {"x_hat": got["x_hat"], "code": got["code"], "losses": world.mean(got["losses"]),
                             "encoded": sorted_code(sae.encode(x, token_ids=ids)), "grads": dense_grads(sae),
                             "weights": optimizer_step(sae, cfg)}
    return results


def rank_capacity_drops_tokens(ranks) -> dict:
    """All tokens to expert 0 (top-2: 0 and 1), at most ceil(0.5 * 32 / 4) = 4 of each rank's 32
    kept per expert."""
    results = {}
    for case in ("skewed", "top2-skewed"):
        sae, x, _ = fresh(case)
        world = ranks.world(expert_parallel=2, expert_capacity=0.5)
        world.prepare(sae, broadcast=True)
        x = next(shard_batches([x], ranks.rank, ranks.size))
        out = sae(x)
        results[case] = {"x_hat": out.x_hat.detach(), "mse": world.mean({"mse": out.mse})["mse"],
                         "stats": world.parallel_stats()}
    return results


def rank_train(ranks) -> dict:
    results = {}
    for case in TRAINED:
        sae_cfg, cfg, _ = CASES[case]
        sae = train(sae_cfg, acts(), cfg, run_dir=ranks.shared / "train" / case, world=ranks.world(expert_parallel=2),
                    progress=False)
        results[case] = {name: t.clone() for name, t in sae.state_dict().items()}
    sae = train(SWITCH, acts(), TRAIN, run_dir=ranks.shared / "train" / "capacity",
                world=ranks.world(expert_parallel=2, expert_capacity=100.0), progress=False)
    results["capacity"] = {name: t.clone() for name, t in sae.state_dict().items()}
    return results


def rank_resume_across_world_sizes(ranks) -> dict:
    """Experts split over 2 ranks, killed after the step-4 checkpoint (the test resumes it alone);
    one process killed likewise, then resumed with the experts split; for each resumed config."""
    results = {}
    for name, sae_cfg in RESUMED.items():
        with pytest.raises(KeyboardInterrupt):
            train(sae_cfg, Interrupted(acts(), at=5), RESUME, run_dir=ranks.shared / name / "2to1",
                  world=ranks.world(expert_parallel=2), progress=False)
        if ranks.rank == 0:
            with pytest.raises(KeyboardInterrupt):
                train(sae_cfg, Interrupted(acts(), at=5), RESUME, run_dir=ranks.shared / name / "1to2", progress=False)
        ranks.barrier()
        sae = train(sae_cfg, acts(), RESUME, run_dir=ranks.shared / name / "1to2", resume=True,
                    world=ranks.world(expert_parallel=2), progress=False)
        results[name] = {key: t.clone() for key, t in sae.state_dict().items()}
    return results


# -- the tests -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    shared = tmp_path_factory.mktemp("expert_parallel")
    return run_on_ranks(__file__, shared), shared


def expert_part(name: str, tensor: torch.Tensor, rank: int) -> torch.Tensor:
    """Rank ``rank``'s rows of a full expert tensor: its two routed experts, then the shared one if any."""
    if name.split()[0] not in ("W_enc", "W_dec"):
        return tensor
    return tensor[LATENTS[rank]] if tensor.shape[0] == 64 else torch.cat([tensor[LATENTS[rank]], tensor[64:]])


@pytest.mark.parametrize("case", CASES)
def test_expert_parallel_equals_one_process(ranks, case):
    results, _ = ranks
    _, cfg, _ = CASES[case]
    with kernels(case):
        sae, x, ids = fresh(case)
        expected = step(sae, x, ids, cfg)
        expected_grads, expected_weights = dense_grads(sae), optimizer_step(sae, cfg)
    if case == "skewed":
        assert expected["out"].extras["assignment"].counts == [64, 0, 0, 0]  # rank 1 gets no token
    for rank, got in enumerate(results("rank_forward_backward_and_step")):
        got, rows = got[case], slice(32 * rank, 32 * (rank + 1))
        torch.testing.assert_close(got["x_hat"], expected["x_hat"][rows], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["code"][0], expected["code"][0][rows], rtol=1e-5, atol=1e-6)
        assert torch.equal(got["code"][1], expected["code"][1][rows])
        torch.testing.assert_close(got["encoded"][0], expected["code"][0][rows], rtol=1e-5, atol=1e-6)
        assert torch.equal(got["encoded"][1], expected["code"][1][rows])
        for name, value in expected["losses"].items():
            torch.testing.assert_close(got["losses"][name], value.detach(), rtol=1e-5, atol=1e-6)
        assert got["grads"].keys() == expected_grads.keys()
        for name, grad in expected_grads.items():
            torch.testing.assert_close(got["grads"][name], expert_part(name, grad, rank), rtol=1e-4, atol=1e-6,
                                       msg=lambda m, n=name, r=rank: f"gradient of {n}, rank {r}: {m}")
        for name, weight in expected_weights.items():
            torch.testing.assert_close(got["weights"][name], expert_part(name, weight, rank), rtol=1e-5, atol=1e-6,
                                       msg=lambda m, n=name, r=rank: f"{n} after a step, rank {r}: {m}")


@pytest.mark.parametrize("case", ["skewed", "top2-skewed"])
def test_a_capacity_factor_drops_the_tokens_over_it_and_counts_their_error(ranks, case):
    results, _ = ranks
    sae, x, _ = fresh(case)
    full = sae(x).x_hat.detach()
    got = [r[case] for r in results("rank_capacity_drops_tokens")]
    x_hat = torch.cat([r["x_hat"] for r in got])
    kept = torch.zeros(64, dtype=torch.bool)
    kept[[0, 1, 2, 3, 32, 33, 34, 35]] = True  # the first 4 tokens of each rank
    torch.testing.assert_close(x_hat[kept], full[kept])
    torch.testing.assert_close(x_hat[~kept], (sae.b_pre / sae.cfg.act_scale).detach().expand(56, -1))
    expected_mse = ((x - x_hat) * sae.cfg.act_scale).pow(2).sum(-1).mean()
    for r in got:
        torch.testing.assert_close(r["mse"], expected_mse, rtol=1e-5, atol=1e-6)
        assert r["stats"] == {"dropped": pytest.approx(56 / 64)}  # of the tokens, or of top-2's entries


@pytest.mark.parametrize("case", TRAINED)
def test_training_with_experts_split_equals_one_process(ranks, case, tmp_path):
    results, shared = ranks
    sae_cfg, cfg, _ = CASES[case]
    sae = train(sae_cfg, acts(), cfg, run_dir=tmp_path, progress=False)
    for got in results("rank_train"):  # bf16 moments: the rows are rounded with one process's noise
        assert_same_weights(got[case], sae.state_dict(), weights_atol(cfg))
    assert_same_logs(shared / "train" / case, tmp_path, ignore=("elapsed_s", "dropped"))


def test_a_capacity_no_batch_reaches_drops_nothing_and_logs_it(ranks, tmp_path):
    results, shared = ranks
    sae = train(SWITCH, acts(), TRAIN, run_dir=tmp_path, progress=False)
    for got in results("rank_train"):
        assert_same_weights(got["capacity"], sae.state_dict())
    assert {json.loads(line)["dropped"] for line in (shared / "train" / "capacity" / "log.jsonl").open()} == {0.0}


@pytest.mark.parametrize("name", RESUMED)
def test_an_expert_parallel_checkpoint_resumes_at_another_world_size(ranks, name, tmp_path):
    results, shared = ranks
    sae_cfg = RESUMED[name]
    full = train(sae_cfg, acts(), RESUME, run_dir=tmp_path, progress=False).state_dict()
    alone = train(sae_cfg, acts(), RESUME, run_dir=shared / name / "2to1", resume=True, progress=False).state_dict()
    assert_same_weights(alone, full)
    assert_same_logs(shared / name / "2to1", tmp_path, ignore=("elapsed_s", "dropped"))
    for got in results("rank_resume_across_world_sizes"):
        assert_same_weights(got[name], full)


def assert_same_weights(got: dict, expected: dict, atol: float = 1e-5) -> None:
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


