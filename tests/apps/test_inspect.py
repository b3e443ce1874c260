"""Feature inspection of a tiny trained Switch SAE against brute force over its dense codes."""
from __future__ import annotations

import re
import shutil
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from switchsae.apps import pages
from switchsae.apps.collect import firing_entries
from switchsae.apps.records import ROW, TOKENS, VALUE, example_acts
from switchsae.apps.config import InspectConfig
from switchsae.apps.directions import final_norm
from switchsae.apps.inspect import parse_features, select_features
from switchsae.cli import main
from switchsae.saes import Latents
from switchsae.saes.io import load_sae, save_sae
from switchsae.sources import shards
from switchsae.sources.cache import ActivationCache
from switchsae.sources.models import load_model

BATCH = 700  # the pages_dir fixture's batch size


@pytest.fixture(scope="module")
def dense(switch_run, tiny_cache):
    """The SAE's codes of every cache row as a dense [T, M] matrix, and router probabilities [T, N],
    batched as inspection batches them (whole windows)."""
    sae, cache = load_sae(switch_run), ActivationCache(tiny_cache)
    per_window = shards.rows_per_window(cache.manifest)
    batch = BATCH // per_window * per_window
    codes, probs = [], []
    with torch.no_grad():
        for start in range(0, cache.n_tokens, batch):
            out = sae(cache.read(start, min(start + batch, cache.n_tokens)))
            codes.append(out.latents.to_dense(sae.cfg.width))
            probs.append(out.extras["assignment"].probs)
    return sae, cache, torch.cat(codes), torch.cat(probs)


@pytest.fixture(scope="module")
def records(pages_dir):
    meta = pages.read_data(pages_dir, pages.META)
    chunks = -(-meta["features"] // meta["chunk"])
    return [r for chunk in range(chunks) for r in pages.read_data(pages_dir, pages.chunk_name(chunk))]


def test_statistics_match_the_dense_codes(records, dense):
    sae, _, z, probs = dense
    assert [r["id"] for r in records] == list(range(sae.cfg.width))
    m = sae.cfg.expert_width
    for r in records:
        column = z[:, r["id"]]
        fired = column > 0
        assert r["count"] == int(fired.sum()) and r["density"] == pytest.approx(fired.float().mean().item(), rel=1e-3)
        assert r["expert"] == r["id"] // m
        if r["count"]:
            assert r["max"] == pytest.approx(column.max().item(), rel=1e-3)
            assert r["mean"] == pytest.approx(column[fired].mean().item(), rel=1e-3)
            p = probs[fired, r["id"] // m]
            assert r["router"]["mean"] == pytest.approx(p.mean().item(), rel=1e-3)
            assert r["router"]["max"] == pytest.approx(p.max().item(), rel=1e-3)


def test_histograms_bin_every_firing_over_the_power_of_two_range(records, dense):
    z = dense[2]
    alive = [r for r in records if r["count"]]
    assert alive
    for r in alive:
        values = z[:, r["id"]][z[:, r["id"]] > 0]
        edge = r["hist"]["edge"]
        assert values.max() <= edge < 2 * values.max()
        expected = torch.bincount((values / edge * 32).floor().long().clamp(max=31), minlength=32).tolist()
        assert r["hist"]["counts"] == expected[:len(r["hist"]["counts"])] and sum(expected) == r["count"]


def test_top_examples_are_the_strongest_firings_with_their_contexts(records, dense):
    _, cache, z, _ = dense
    windows, per_window = cache.windows(), shards.rows_per_window(cache.manifest)
    checked = 0
    for r in records:
        column = z[:, r["id"]]
        expected = column.topk(min(10, r["count"])).values
        assert [e[VALUE] for e in r["top"]] == pytest.approx(expected.tolist(), rel=1e-3)
        for e in r["top"]:
            _check_context(e, r["id"], column, windows, per_window, cache)
            checked += 1
    assert checked > 100


def _check_context(example, feature, column, windows, per_window, cache):
    """Tokens are the window's, the example's token is the row's, and every shade is z on that row."""
    row, _, at, tokens, _ = example
    window, position = row // per_window, row % per_window + 1
    assert tokens == windows[window, position - at:position - at + len(tokens)].tolist()
    assert tokens[at] == int(cache.token_ids([row])[0])
    for offset, act in enumerate(example_acts(example)):
        cached = window * per_window + position - at + offset - 1
        if position - at + offset < 1 or cached >= len(column):  # the attention sink, the cache's end
            assert act is None
        else:
            assert act == pytest.approx(column[cached].item(), rel=1e-2, abs=1e-3)


def test_interval_samples_are_real_firings_inside_their_intervals(records, dense):
    _, cache, z, _ = dense
    windows, per_window = cache.windows(), shards.rows_per_window(cache.manifest)
    for r in records:
        column = z[:, r["id"]]
        values = column[column > 0]
        per_interval = torch.bincount((values / r["hist"]["edge"] * 8).floor().long().clamp(max=7), minlength=8)
        assert [round(g["lo"] / r["hist"]["edge"] * 8) for g in r["samples"]] == per_interval.nonzero().squeeze(1).tolist()
        for g, count in zip(r["samples"], per_interval[per_interval > 0].tolist()):
            assert g["hi"] - g["lo"] == pytest.approx(r["hist"]["edge"] / 8) and len(g["examples"]) == min(2, count)
            for e in g["examples"]:
                assert g["lo"] <= e[VALUE] < g["hi"] * (1 + 1e-3)
                assert e[VALUE] == pytest.approx(column[e[ROW]].item(), rel=1e-3)
                _check_context(e, r["id"], column, windows, per_window, cache)


def test_boosted_tokens_and_nearest_rows_match_brute_force(records, dense, llama_dir):
    sae = dense[0]
    model, _ = load_model(str(llama_dir))
    norm = final_norm(model)
    W = sae.W_dec.detach()
    logits = (norm(W) - norm(torch.zeros(1, W.shape[1]))) @ model.get_output_embeddings().weight.t()
    unit = torch.nn.functional.normalize(W, dim=1)
    cos = unit @ unit.t()
    expert = torch.arange(sae.cfg.width) // sae.cfg.expert_width
    cos[expert[:, None] == expert[None, :]] = float("-inf")
    for r in records[::17]:
        j = r["id"]
        assert [t for t, _ in r["boost"]] == logits[j].topk(10).indices.tolist()
        assert [t for t, _ in r["suppress"]] == (-logits[j]).topk(10).indices.tolist()
        assert [v for _, v in r["boost"]] == pytest.approx(logits[j].topk(10).values.tolist(), rel=1e-3)
        assert [i for i, _ in r["near"]] == cos[j].topk(5).indices.tolist()
        assert all(i // sae.cfg.expert_width != r["expert"] for i, _ in r["near"])


def test_index_vocab_and_meta_describe_the_records(pages_dir, records, tiny_cache):
    index, vocab = pages.read_data(pages_dir, pages.INDEX), pages.read_data(pages_dir, pages.VOCAB)
    meta = pages.read_data(pages_dir, pages.META)
    assert index["id"] == [r["id"] for r in records] and index["density"] == [r["density"] for r in records]
    assert all(str(t) in vocab for r in records for e in r["top"] for t in e[TOKENS])
    assert meta["rows"] == ActivationCache(tiny_cache).n_tokens and meta["experts"] == 4
    assert pages.load_record(pages_dir, 37) == records[37]
    assert all((pages_dir / name).is_file() for name in pages.SITE_FILES)


def test_cli_inspects_a_subset_of_one_expert(tmp_path, switch_run, tiny_cache, capsys):
    out = tmp_path / "pages"
    main(["inspect", str(switch_run), "--acts", str(tiny_cache), "--out", str(out), "--features", "0-70,200",
          "--expert", "1", "--tokens", "1000", "--neighbours", "0", "--quiet"])
    assert "switchsae serve" in capsys.readouterr().out
    index = pages.read_data(out, pages.INDEX)
    assert index["id"] == list(range(64, 71)) and set(index["expert"]) == {1}
    assert pages.read_data(out, pages.META)["rows"] == 1023  # 1000 rounded up to 33 windows of 31 rows
    assert "near" not in pages.load_record(out, 64)


@pytest.mark.parametrize("args, message", [
    (["--features", "250-300"], "Feature 256 is out of range: the SAE has 256 latents"),
    (["--expert", "4"], "Expert 4 is out of range: the SAE has 4 experts"),
    (["--features", "3-x"], "Cannot read the feature list '3-x'"),
    (["--features", "0-9", "--expert", "2"], "No features selected"),
    (["--intervals", "3"], "intervals (3) must divide the number of histogram bins (32)"),
    (["--bins", "24"], "bins must be a power of two, got 24"),
])
def test_cli_refuses_bad_selections_in_one_line(tmp_path, switch_run, tiny_cache, capsys, args, message):
    with pytest.raises(SystemExit):
        main(["inspect", str(switch_run), "--acts", str(tiny_cache), "--out", str(tmp_path / "p"), *args, "--quiet"])
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_inspect_refuses_a_run_of_another_hook(tmp_path, switch_run, tiny_cache, capsys):
    sae = load_sae(switch_run)
    sae.cfg = sae.cfg.replace(hook_name="blocks.2.hook_resid_post")
    save_sae(sae, tmp_path / "other")
    with pytest.raises(SystemExit):
        main(["inspect", str(tmp_path / "other"), "--acts", str(tiny_cache), "--out", str(tmp_path / "p"), "--quiet"])
    assert "does not match (hook: cache has 'blocks.1.hook_resid_post'" in capsys.readouterr().err


def test_inspect_refuses_a_cache_without_token_ids(tmp_path, switch_run, tiny_cache, capsys):
    old = shutil.copytree(tiny_cache, tmp_path / "old")  # as caches were before token ids were stored
    manifest = shards.read_manifest(old)
    for entry in manifest["shards"]:
        (old / entry.pop("windows")).unlink()
        entry.pop("windows_sha256")
    shards.write_manifest(old, manifest)
    with pytest.raises(SystemExit):
        main(["inspect", str(switch_run), "--acts", str(old), "--out", str(tmp_path / "p"), "--quiet"])
    assert "stores no token ids" in capsys.readouterr().err


def test_inspect_never_overwrites_a_folder_that_is_not_pages(tmp_path, switch_run, tiny_cache, capsys):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        main(["inspect", str(switch_run), "--acts", str(tiny_cache), "--out", str(tmp_path / "p"), "--tokens", "100",
              "--quiet"])
    assert "not feature pages" in capsys.readouterr().err and (tmp_path / "p" / "notes.txt").exists()


def test_feature_lists_and_selection():
    assert parse_features("3, 5-7,,9") == [3, 5, 6, 7, 9]
    assert select_features(16, 4, [9, 1, 9], expert=2).tolist() == [9]
    assert select_features(8, 1).tolist() == list(range(8))
    with pytest.raises(ValueError, match="Switch SAEs only"):
        select_features(8, 1, expert=0)


def test_every_inspect_setting_is_read():
    sources = "".join(p.read_text() for p in (Path(pages.__file__).parents[1]).glob("*.py") if p.name != "config.py")
    for f in fields(InspectConfig):
        assert re.search(rf"\.{f.name}\b", sources), f"InspectConfig.{f.name} is never read"
        assert f.metadata.get("help")
    with pytest.raises(ValueError, match="top must be a positive integer"):
        InspectConfig(top=0)


def test_sparse_and_dense_codes_give_the_same_entries():
    values = torch.tensor([[0.5, 0.0, 2.0], [1.0, 3.0, 0.0]])
    indices = torch.tensor([[7, 1, 2], [4, 0, 3]])
    row, latent, value = firing_entries(Latents(values, indices))
    assert (row.tolist(), latent.tolist(), value.tolist()) == ([0, 0, 1, 1], [2, 7, 0, 4], [2.0, 0.5, 3.0, 1.0])
    dense = Latents(values.new_zeros(2, 8).scatter_(1, indices, values))
    assert [t.tolist() for t in firing_entries(dense)] == [row.tolist(), latent.tolist(), value.tolist()]


def test_an_sae_without_experts_gets_pages_without_expert_fields(tmp_path, tiny_cache):
    run = tmp_path / "topk"
    main(["train", "--acts", str(tiny_cache), "--arch", "topk", "--width", "32", "--k", "4", "--steps", "5",
          "--batch-size", "256", "--out", str(run), "--quiet"])
    main(["inspect", str(run), "--acts", str(tiny_cache), "--out", str(tmp_path / "p"), "--tokens", "2000", "--quiet"])
    record = pages.load_record(tmp_path / "p", 5)
    assert "expert" not in record and "router" not in record
    assert len(record["near"]) == 5 and 5 not in [j for j, _ in record["near"]]


@pytest.mark.parametrize("routing, router_stats", [(["--router", "top_e", "--experts-per-token", "2", "--shared-expert"], True),
                                                   (["--router", "hash"], False)])
def test_routing_variants_get_their_router_statistics(tmp_path, tiny_cache, routing, router_stats):
    """top-e with a shared expert: a latent's router p is its own expert's on the tokens it fires on,
    1 for the shared block (its gate); hash routing learns no router, so there is nothing to show."""
    run = tmp_path / "run"
    main(["train", "--acts", str(tiny_cache), "--arch", "switch", "--width", "48", "--experts", "2", "--k", "4",
          "--steps", "5", "--batch-size", "256", *routing, "--out", str(run), "--quiet"])
    main(["inspect", str(run), "--acts", str(tiny_cache), "--out", str(tmp_path / "p"), "--tokens", "2000", "--quiet"])
    records = [pages.load_record(tmp_path / "p", j) for j in range(48)]
    blocks = 3 if router_stats else 2
    assert pages.read_data(tmp_path / "p", pages.META)["experts"] == blocks
    assert {r["expert"] for r in records} == set(range(blocks))
    fired = [r for r in records if r["count"]]
    assert all(("router" in r) == router_stats for r in fired)
    if router_stats:
        shared = [r for r in fired if r["expert"] == 2]
        assert shared and all(r["router"] == {"mean": 1.0, "max": 1.0} for r in shared)
        assert all(0 < r["router"]["mean"] <= r["router"]["max"] <= 1 for r in fired)
