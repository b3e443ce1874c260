"""Autointerp's pure parts: prompts and the reading of replies, balanced accuracy and t intervals,
the stratified sample, the example split and fuzzing cases, the output folder's resume rules."""
from __future__ import annotations

import json
import re
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch

from switchsae.apps.autointerp import prompts
from switchsae.apps.autointerp.config import AutointerpConfig, EndpointConfig
from switchsae.apps.autointerp.examples import split_examples, stratified_sample
from switchsae.apps.autointerp.score import fuzz_cases, quiet_positions
from switchsae.apps.autointerp.stats import (
    balanced_accuracy,
    confusion,
    mean_ci,
    t_quantile,
)
from switchsae.apps.autointerp.store import FEATURES, RunStore

EXAMPLE = {"row": 7, "value": 2.5, "at": 2, "tokens": ["The", " big", " cat", " sat", "."],
           "acts": [None, 0.0, 2.5, 0.4, 0.0]}


def test_explainer_sees_every_active_token_marked():
    assert prompts.render(EXAMPLE, prompts.active_positions(EXAMPLE)) == "The big <<cat>> <<sat>>."
    user = prompts.explain_messages([EXAMPLE, EXAMPLE])[1]["content"]
    assert "1. The big <<cat>> <<sat>>." in user and "2. The big" in user
    assert "Most often marked: cat, sat" in user


def test_detection_shows_the_text_unmarked_and_fuzzing_marks_one_token():
    detect = prompts.detect_messages("cats", EXAMPLE)[1]["content"]
    assert "Explanation: cats" in detect and "Text: The big cat sat." in detect and "<<" not in detect
    fuzz = prompts.fuzz_messages("cats", EXAMPLE, 1)[1]["content"]
    assert "Text: The <<big>> cat sat." in fuzz and "marked token <<big>>" in fuzz


def test_the_explanation_comes_before_the_text():
    """So a server that caches the prompt prefix reuses it across a feature's scoring requests."""
    a, b = (prompts.detect_messages("cats", {**EXAMPLE, "tokens": t}) for t in (["a"] * 5, ["b"] * 5))
    assert a[1]["content"].split("Text:")[0] == b[1]["content"].split("Text:")[0]


@pytest.mark.parametrize("reply, verdict", [
    ("Yes", True), ("no.", False), (" YES, it is", True), ("Answer: No", False), ("true", True),
    ("The feature is not active here", False), ("inactive", False), ("It is active.", True),
    ("Nope, I cannot tell", None), ("", None), ("maybe", None), ("Not sure; yes", True),
])
def test_scorer_replies_are_read_by_their_first_verdict(reply, verdict):
    assert prompts.parse_verdict(reply) is verdict


@pytest.mark.parametrize("reply, explanation", [
    ("Explanation: words about structure.\nMore text", "words about structure."),
    ("\n\n  \"the word 'cat'\"  ", "the word 'cat'"),
    ("1. Mentions of algebra", "Mentions of algebra"),
    ("The feature detects: dates", "dates"),
    ("", ""),
])
def test_explanations_are_the_first_line_without_labels(reply, explanation):
    assert prompts.parse_explanation(reply) == explanation


def test_balanced_accuracy():
    counts = confusion([True, True, True, True, False, False], [True, True, True, False, False, True])
    assert counts == {"tp": 3, "fn": 1, "tn": 1, "fp": 1}
    assert balanced_accuracy(counts) == pytest.approx((3 / 4 + 1 / 2) / 2)
    assert balanced_accuracy(confusion([True, True], [True, False])) is None  # one class only


@pytest.mark.parametrize("dof, quantile", [(1, 12.7062), (2, 4.3027), (9, 2.2622), (29, 2.0452), (1000, 1.9623)])
def test_t_quantiles_match_the_tables(dof, quantile):
    assert t_quantile(0.975, dof) == pytest.approx(quantile, abs=1e-4)


def test_mean_ci():
    ci = mean_ci([0.5, 0.7, 0.9, 0.6])
    sd = np.std([0.5, 0.7, 0.9, 0.6], ddof=1)
    assert ci["mean"] == pytest.approx(0.675) and ci["n"] == 4
    assert ci["hi"] - ci["mean"] == pytest.approx(3.1824 * sd / 2, rel=1e-4)
    assert mean_ci([0.8])["lo"] == mean_ci([0.8])["hi"] == 0.8 and mean_ci([])["mean"] is None


def test_the_sample_is_stratified_by_expert_and_density():
    counts = torch.zeros(400, dtype=torch.long)
    counts[:100] = torch.arange(1, 101)  # expert 0: 100 scorable latents, of every density
    counts[100:150] = 50  # expert 1: 50; experts 2 and 3: dead
    picks = stratified_sample(counts, 100, 30, seed=3, min_count=1)
    assert len(set(picks)) == 30 and picks == sorted(picks)
    assert sum(p < 100 for p in picks) == 20 and sum(100 <= p < 150 for p in picks) == 10
    densities = sorted(int(counts[p]) for p in picks if p < 100)
    assert densities[0] <= 5 and densities[-1] >= 96  # the whole density range of expert 0
    assert picks == stratified_sample(counts, 100, 30, seed=3, min_count=1)


def test_a_sample_larger_than_the_scorable_latents_is_refused():
    counts = torch.tensor([0, 3, 20, 20, 0])
    assert stratified_sample(counts, 5, 2, seed=0, min_count=10) == [2, 3]
    with pytest.raises(ValueError, match="--features 3 asks for more latents than can be scored: 2 of"):
        stratified_sample(counts, 5, 3, seed=0, min_count=10)


def _record_example(row: int, value: float) -> list:
    return [row, value, 0, [1, 2], []]


def test_the_explainer_and_the_scorer_never_share_an_example():
    record = {"top": [_record_example(r, 10 - r) for r in range(10)],
              "samples": [{"lo": 0, "hi": 1, "examples": [_record_example(100 + 2 * g, 1), _record_example(101 + 2 * g, 1)]}
                          for g in range(4)] + [{"lo": 1, "hi": 2, "examples": [_record_example(200, 1)]}]}
    explain, held = split_examples(record, 5, np.random.default_rng(0))
    def rows(examples):
        return [e[0] for e in examples]

    assert rows(explain)[:5] == [0, 1, 2, 3, 4] and len(explain) == 5 + 5  # one sample per interval
    assert not set(rows(explain)) & set(rows(held)) and len(held) == 4 + 5
    assert rows(held)[-5:] == [5, 6, 7, 8, 9]  # interval samples first, then the rest of the top


def test_fuzzing_marks_firing_tokens_true_and_quiet_tokens_false():
    other = {**EXAMPLE, "row": 8, "acts": [0.0, 0.0, 1.0, 0.0, 0.0], "tokens": ["a", " b", " c", " ", " e"]}
    cases = fuzz_cases([EXAMPLE], [other], [], 1, np.random.default_rng(0))
    assert cases[0] == (EXAMPLE, 2, True)
    example, position, truth = cases[1]
    assert example is other and not truth and position in (0, 1, 4)  # not the firing token, not blank
    assert quiet_positions(EXAMPLE) == [1, 4]  # None (not cached) is not known to be quiet


def test_the_store_resumes_and_refuses_other_settings(tmp_path):
    store = RunStore(tmp_path, {"config": {"features": 2}})
    store.append({"id": 5, "x": 1})
    (tmp_path / FEATURES).open("a").write('{"id": 6, "x"')  # a line cut off by a kill
    again = RunStore(tmp_path, {"config": {"features": 2}})
    assert list(again.done) == [5] and (tmp_path / FEATURES).read_text().endswith("}\n")
    with pytest.raises(ValueError, match="holds an autointerp run with other settings \\(config\\)"):
        RunStore(tmp_path, {"config": {"features": 3}})


def test_configs_refuse_bad_values():
    with pytest.raises(ValueError, match="Give either --features N"):
        AutointerpConfig()
    with pytest.raises(ValueError, match="not both"):
        AutointerpConfig(features=3, ids="1,2")
    with pytest.raises(ValueError, match="scored must be a positive integer"):
        AutointerpConfig(features=3, scored=0)
    with pytest.raises(ValueError, match="retries must be a positive integer"):
        EndpointConfig(retries=0)


@pytest.mark.parametrize("field", [f.name for cls in (AutointerpConfig, EndpointConfig) for f in fields(cls)])
def test_every_setting_is_read(field):
    package = Path(__file__).resolve().parents[2] / "switchsae" / "apps" / "autointerp"
    sources = [p.read_text() for p in package.glob("*.py") if p.name != "config.py"]
    assert any(re.search(rf"\.{field}\b", text) for text in sources), f"{field} is never read"
    assert json.dumps(field)
