"""Claim checks: setting kinds, log-log interpolation, Switch/TopK/L1 pairing and the verdicts."""
from __future__ import annotations

import pytest

from switchsae.analysis.claims import claims_section, dominated, interpolate_log, paired_comparisons, setting_kind


def run(arch: str, width: int, mse: float, l0: float, n_experts: int = 1, k: int | None = None, **extra) -> dict:
    row = {"setting": "s", "name": f"{arch}-{width}-{n_experts}-{k}-{l0}", "arch": arch, "width": width,
           "n_experts": n_experts, "mse": mse, "l0": l0, "flops_per_token": width // n_experts, **extra}
    if k is not None:
        row["k"] = k
    return row


def test_setting_kind_reads_the_width_rule_off_the_runs():
    topk = run("topk", 2048, 1.0, 32, k=32)
    assert setting_kind([topk, run("switch", 8192, 1.0, 32, n_experts=4, k=32)]) == "flop_matched"
    assert setting_kind([topk, run("switch", 2048, 1.0, 32, n_experts=4, k=32)]) == "fixed_width"
    assert setting_kind([topk, run("switch", 4096, 1.0, 32, n_experts=4, k=32)]) is None
    assert setting_kind([topk, run("relu", 2048, 1.0, 40)]) is None


def test_interpolation_is_linear_in_log_log_and_refuses_to_extrapolate():
    points = [(10, 100.0), (1000, 1.0)]
    assert interpolate_log(points, 100) == pytest.approx(10.0)
    assert interpolate_log(points, 10) == pytest.approx(100.0)
    assert interpolate_log(points, 5) is None and interpolate_log(points, 2000) is None
    assert interpolate_log([(32, 7.0)], 32) == 7.0


def test_switch_runs_are_paired_with_topk_of_the_same_k_and_seed_and_with_l1_at_their_l0():
    rows = [run("topk", 2048, 100.0, 32, k=32, loss_recovered=0.90),
            run("topk", 2048, 90.0, 32, k=32, seed=1, loss_recovered=0.91),
            run("switch", 8192, 80.0, 32, n_experts=4, k=32, loss_recovered=0.93),
            run("switch", 8192, 99.0, 32, n_experts=4, k=32, seed=1, lr_width="expert", loss_recovered=0.90),
            run("relu", 2048, 200.0, 16), run("relu", 2048, 50.0, 64)]
    first, second = paired_comparisons(rows)
    assert first["series"] == "switch N=4" and second["series"] == "switch N=4 lr(M/N)"
    assert first["mse_vs_topk"] == pytest.approx(-0.2) and first["lr_minus_topk"] == pytest.approx(0.03)
    assert second["mse_vs_topk"] == pytest.approx(0.1) and second["lr_minus_topk"] == pytest.approx(-0.01)
    assert first["mse_vs_relu"] == pytest.approx(80 / 100 - 1)  # relu at L0 32: geometric mean of 200 and 50
    assert "mse_vs_gated" not in first
    assert first["flops_vs_topk"] == pytest.approx(1.0)


def test_claims_section_states_a_verdict_per_series_and_setting():
    rows = [run("topk", 2048, 100.0, k, k=k) for k in (16, 32)]
    rows += [run("switch", 4096, mse, k, n_experts=2, k=k) for k, mse in ((16, 90.0), (32, 110.0))]
    efficiency = [{"setting": "s", "run": "a", "speedup": 2.0}, {"setting": "s", "run": "b", "speedup": ""},
                  {"setting": "other", "run": "c", "speedup": 9.0}]
    duplication = [{"setting": "s", "k": 16, "n_experts": 2, "dup_mean_max_cos": 0.25, "dup_frac_above": 0.0}]
    text = "\n\n".join(claims_section(rows, efficiency, duplication))
    assert "### Claim 1 (FLOP-matched" in text and "setting `s`" in text
    assert "| switch N=2 | 1/2 |" in text  # MSE below TopK at one of the two k
    assert "1/2 FLOP-matched Switch runs reach their TopK's final training FVU" in text and "a 2.00x" in text
    assert "9.00x" not in text  # only FLOP-matched settings count for claim 3
    assert "`s` k=16: N=2: 0.250 (0.000)" in text


def test_a_baseline_run_is_dominated_by_a_run_with_no_more_l0_and_no_more_mse():
    switch = [run("switch", 8192, 50.0, 64, n_experts=16, k=64), run("switch", 8192, 80.0, 16, n_experts=16, k=16)]
    relu = [run("relu", 8192, 60.0, 200), run("relu", 8192, 40.0, 250), run("relu", 8192, 90.0, 10)]
    assert dominated(relu, switch) == 1  # only the first: the second has lower MSE, the third lower L0
    rows = [run("topk", 8192, 45.0, 64, k=64), run("topk", 8192, 70.0, 16, k=16), *switch, *relu]
    assert "| switch N=16 | 0/2 | n/a | 2/2 | 1/3 | n/a | n/a |" in "\n".join(claims_section(rows, [], []))
