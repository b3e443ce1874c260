"""The peer benchmark's protocol (benchmarks/peers.py + peer_workers), on tiny sizes.

The fast test runs only our worker, in this Python. The slow one also runs every peer whose
virtual environment exists (benchmarks/PEERS.md) and skips the others.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--steps", "3", "--warmup", "1", "--batch-size", "64", "--width", "128", "--k", "4", "--eval-rows", "100",
        "--threads", "1", "--timeout", "120"]


def _harness():
    spec = importlib.util.spec_from_file_location("peers_harness", ROOT / "benchmarks" / "peers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def acts_file(tmp_path) -> Path:
    path = tmp_path / "acts.npy"
    np.save(path, np.random.default_rng(0).standard_normal((1000, 32)).astype(np.float32) + 2.0)
    return path


def _check_row(row: dict) -> None:
    assert "error" not in row, row
    assert row["tokens_per_s"] > 0 and row["train_s"] > 0 and row["timed_steps"] == 2
    assert 0 < row["peak_rss_gb"] < 16
    assert 0 <= row["fvu"] < 10 and row["l0"] == pytest.approx(4.0) and 0 <= row["dead_frac"] <= 1


def test_switchsae_worker_through_the_harness(acts_file, tmp_path, capsys):
    harness = _harness()
    out = tmp_path / "results.json"
    results = harness.main(["--acts", str(acts_file), "--peers", "switchsae", "--json-out", str(out), *TINY])
    assert [r["peer"] for r in results] == ["switchsae"]
    ours = results[0]
    _check_row(ours)
    # the shared metrics agree with switchsae.evaluate on the same rows
    assert ours["fvu"] == pytest.approx(ours["fvu_own_evaluate"], rel=1e-5)
    printed = capsys.readouterr().out
    assert "| switchsae |" in printed and "no peer finished" in printed
    assert json.loads(out.read_text())["results"][0]["peer"] == "switchsae"


def test_missing_interpreter_is_a_failed_row_not_a_crash(acts_file, capsys):
    harness = _harness()
    results = harness.main(["--acts", str(acts_file), "--peers", "sparsify",
                            "--python-for", f"sparsify={sys.prefix}/no/such/python", *TINY])
    assert "no interpreter" in results[0]["error"]
    assert "FAILED" in capsys.readouterr().out


@pytest.mark.slow
def test_every_installed_peer_through_the_harness(acts_file):
    harness = _harness()
    installed = [name for name in ("saelens", "sparsify", "dictlearn") if harness.python_for(name, {}).exists()]
    if not installed:
        pytest.skip("no peer virtual environment under /work/peers (see benchmarks/PEERS.md)")
    results = harness.main(["--acts", str(acts_file), "--peers", *installed, "switchsae", *TINY])
    for row in results:
        _check_row(row)


def test_switch_variant_scored_on_another_domain(acts_file, tmp_path):
    other = tmp_path / "other.npy"
    np.save(other, np.random.default_rng(1).standard_normal((300, 32)).astype(np.float32) * 3.0)
    harness = _harness()
    results = harness.main(["--acts", str(acts_file), "--other-acts", str(other), "--peers", "switchsae",
                            "switchsae-switch4", *TINY])
    dense, switch = results
    _check_row(dense)
    _check_row(switch)
    assert "Switch 4 x 128" in switch["notes"] and "Switch" not in dense["notes"]
    # the other domain is scored on its own rows: a different FVU from the held-out rows'
    for row in results:
        assert 0 <= row["fvu_other"] < 10 and row["fvu_other"] != pytest.approx(row["fvu"])
        assert row["l0_other"] == pytest.approx(4.0)
