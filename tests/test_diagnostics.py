"""The SAE diagnostics of benchmarks/ (dead latents by rows seen, router against the best expert) on tiny SAEs."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from switchsae.config import SAEConfig, TrainConfig
from switchsae.evaluate import evaluate
from switchsae.saes import build_sae

ROOT = Path(__file__).resolve().parents[1]


def _benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sae(acts: torch.Tensor, **settings):
    sae = build_sae(SAEConfig.from_flat(d_model=acts.shape[1], k=4, **settings))
    sae.reset_parameters(torch.Generator().manual_seed(0))
    sae.init_from_data(acts[:256])
    return sae


@pytest.mark.parametrize("settings", [dict(arch="topk", width=64), dict(arch="switch", width=128, n_experts=4),
                                      dict(arch="switch", width=160, n_experts=4, shared_expert=True)])
def test_dead_latents_by_rows_end_at_the_evaluated_dead_fraction(acts, settings):
    sae = _sae(acts, **settings)
    batches = list(acts.split(250))
    rows, fired, chances = _benchmark("dead_latents").firing_by_rows(sae, batches, [500, 1000, 2000])
    entries_per_token = 2 if settings.get("shared_expert") else 1  # the routed expert (and the shared one)
    assert int(fired.sum()) == 2000 * 4 and int(chances.sum()) == 2000 * entries_per_token  # k = 4 a token
    assert [r["rows"] for r in rows] == [500, 1000, 2000]
    never = [r["never fired"] for r in rows]
    assert never == sorted(never, reverse=True)  # more rows: never fewer latents seen firing
    assert rows[-1]["never fired"] == pytest.approx(evaluate(sae, batches, progress=False)["dead_frac"])
    assert all(r["rare"] >= r["never fired"] for r in rows)
    if settings["arch"] == "topk":
        assert [r["fewest chances"] for r in rows] == [500, 1000, 2000]
    else:  # top-1: each token is one chance for one routed expert's latents
        assert 0 < rows[-1]["fewest chances"] <= 2000 // 4


def test_the_oracle_expert_is_never_worse_than_the_routers_and_the_router_matches_evaluate(acts):
    sae = _sae(acts, arch="switch", width=128, n_experts=4)
    scores = _benchmark("routing_oracle").oracle_scores(sae, acts, batch=700)
    assert scores["fve oracle"] >= scores["fve router"]
    assert 0 <= scores["router picks the best"] <= 1 and 0 <= scores["best is the second choice"] <= 1
    assert scores["fve router"] == pytest.approx(evaluate(sae, acts.split(700), progress=False)["fve"], abs=1e-5)


def test_with_one_expert_the_router_always_picks_the_best(acts):
    sae = _sae(acts, arch="switch", width=64, n_experts=1)
    scores = _benchmark("routing_oracle").oracle_scores(sae, acts)
    assert scores["router picks the best"] == 1
    assert math.isnan(scores["best is the second choice"])  # no wrong pick to look at
    assert scores["fve oracle"] == pytest.approx(scores["fve router"])


def test_every_recipe_study_variant_builds_and_is_flop_matched_to_topk_4096_unless_named_fixed_width():
    """A study's variant is an SAE and a training configuration the library accepts, and its encoder costs
    ``2·d·M0`` a token like TopK-4096's (router and decoder aside), except the fixed-width ones."""
    recipe = _benchmark("recipe")
    d = 64
    for study, variants in recipe.STUDIES.items():
        for name, variant in variants.items():
            sae_settings, train_settings = recipe.split_settings(variant)
            sae = build_sae(SAEConfig.from_flat(d_model=d, k=recipe.K, **sae_settings))
            TrainConfig(**train_settings)
            router = 2 * d * sae.cfg.n_experts if sae.cfg.arch == "switch" and sae.router.learned else 0
            encoder = sae.flops()["forward"] - router - 2 * recipe.K * d
            assert (encoder == 2 * d * recipe.M0) != ("fixed width" in name), (study, name, encoder)
