"""Feature absorption on the first-letter task (SAEBench's definition; Chanin et al. 2024).

Given the words' activations (:mod:`switchsae.evals.spelling`):

1. **Ground-truth probe.** 26 one-vs-rest logistic probes on the raw activations of the train words
   (:func:`switchsae.evals.logistic.fit_probe_bank`: Adam, lr 1e-2, 50 epochs, batch 64, weight
   decay 1e-4, SAEBench's); letter ``L``'s direction ``p̂_L = W_L / ‖W_L‖``. A letter is evaluated
   when its probe's F1 on the test words (score > 0) exceeds ``min_probe_f1`` (0.6).
2. **k-sparse probing.** An L1-penalised probe bank on the train words' SAE codes (λ₁ = 0.01, batch
   4096); letter ``L``'s latents ranked by their weight in it; for ``k = 1..max_k`` a logistic probe on
   the top ``k`` (balanced, :func:`fit_logistic`) scored by F1 on the test words.
3. **Main latents (feature splitting).** Starting at ``k = 1``, ``k`` grows while the F1 of the
   ``k``-sparse probe beats the best so far by more than ``f1_jump`` (0.03); the last such top-``k``
   set is letter ``L``'s main latents ``S_L``. A letter has a *clear main latent* when one latent alone
   (``k = 1``) already detects it with F1 ≥ ``min_probe_f1``.
4. **Absorption**, on the test words of letter ``L`` that its probe finds (score > 0). With ``x``
   the raw activation, ``z`` its code, ``s`` the SAE's ``act_scale`` and ``W_dec[j]`` latent ``j``'s
   decoder row, ``P = x·p̂`` is the probe projection, ``c_j = cos(W_dec[j], p̂)`` and
   ``π_j = z_j (W_dec[j]·p̂) / s`` the projection of latent ``j``'s share of the reconstruction
   (``z_j c_j / s`` for unit-norm rows; SAEBench's ``z_j c_j`` for ``s = 1``). ``Π_main = Σ_{j∈S} π_j``;
   ``A`` = the sum of the 3 largest ``π_j > 0`` over latents ``j ∉ S`` with ``c_j ≥ 0.1``.

   - absorption fraction: 0 if ``Π_main ≥ P`` or ``A / P < 0.4``; else 1 if ``Π_main ≤ 0``; else
     ``a / (a + Π_main)`` with ``a = min(A, P − Π_main)``;
   - full absorption: every main latent is silent (``z_j < 1e-8``), the latent with the largest
     ``π_j`` has ``c_j ≥ 0.025``, ``P ≥ 0`` and that latent's ``π_j / P ≥ 0.4``.

   Per letter: the mean absorption fraction and the full-absorption rate over its probe-found
   words; the scores are their means over the evaluated letters.

For a Switch SAE it also records which expert holds each letter's first main latent and, over
full-absorption cases, how often the absorbing latent sits in the same expert.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from switchsae.analysis.tables import markdown_table
from switchsae.config import opt
from switchsae.evals.logistic import ProbeBank, fit_logistic, fit_probe_bank
from switchsae.evals.runs import check_width, expert_of_latents, load_runs, save_result
from switchsae.evals.spelling import LETTERS, SpellingSplit, spelling_data
from switchsae.evals.stats import f1_score
from switchsae.saes import SparseAutoencoder

EPS = 1e-8


@dataclass(frozen=True)
class AbsorptionConfig:
    """Settings of the first-letter absorption eval (``switchsae absorption`` flags)."""

    words: int = opt(4000, "vocabulary words sampled (all if the vocabulary is smaller)")
    train_fraction: float = opt(0.8, "share of the words the probes train on")
    icl_examples: int = opt(10, "example lines before the first word read in each prompt")
    words_per_prompt: int = opt(30, "words read per prompt, after the example lines")
    seed: int = opt(42, "seed of the word sample, split and prompts")
    max_k: int = opt(10, "largest k of the k-sparse probes")
    f1_jump: float = opt(0.03, "F1 gain that adds a latent to a letter's main latents")
    min_probe_f1: float = opt(0.6, "test F1 a letter's ground-truth probe needs to be evaluated")
    l1: float = opt(0.01, "L1 weight of the probe bank that ranks latents")
    batch_size: int = opt(8, "prompts per forward pass")


# SAEBench's thresholds (feature_absorption.py), part of the definition rather than settings
FULL_COS, FRACTION_COS, PROPORTION, MAX_ABSORBERS = 0.025, 0.1, 0.4, 3


def letter_bank(x: Tensor, letters: Tensor, **settings) -> ProbeBank:
    """A probe bank for the 26 letters on rows ``x``; a letter no training word starts with gets a
    probe that never fires (zero weights, bias −1), so it is never evaluated."""
    present = letters.unique()
    bank = fit_probe_bank(x, F.one_hot(letters, len(LETTERS))[:, present].float(), **settings)
    weight = torch.zeros(len(LETTERS), x.shape[1])
    bias = torch.full((len(LETTERS),), -1.0)
    weight[present], bias[present] = bank.weight, bank.bias
    return ProbeBank(weight, bias)


def ground_truth_probe(train: SpellingSplit, test: SpellingSplit) -> tuple[ProbeBank, list[float]]:
    """Step 1: the probe bank on raw activations and each letter's test F1."""
    bank = letter_bank(train.acts, train.letters, epochs=50, lr=1e-2, weight_decay=1e-4, batch_size=64)
    scores = bank.scores(test.acts)
    return bank, [f1_score(scores[:, c] > 0, test.letters == c) for c in range(len(LETTERS))]


def dense_codes(sae: SparseAutoencoder, acts: Tensor, batch_size: int = 2048) -> Tensor:
    """``[n, M]`` codes of raw activations."""
    with torch.no_grad():
        return torch.cat([sae.encode(acts[i:i + batch_size]).to_dense(sae.cfg.width).float()
                          for i in range(0, acts.shape[0], batch_size)])


def main_latents(ranking: list[int], f1s: list[float], jump: float) -> list[int]:
    """Step 3: the top-``k`` of ``ranking`` for the last ``k`` whose F1 (``f1s[k-1]``) beat the best
    so far by more than ``jump``, ``k = 1`` always counting."""
    best, chosen = float("-inf"), []
    for k, f1 in enumerate(f1s, 1):
        if f1 <= best + jump:
            break
        best, chosen = f1, ranking[:k]
    return chosen


def k_sparse(train_codes: Tensor, train: SpellingSplit, test_codes: Tensor, test: SpellingSplit,
             cfg: AbsorptionConfig, letter: int, bank: ProbeBank) -> tuple[list[int], list[float]]:
    """Step 2 for one letter: the top ``max_k`` latents of the L1 bank and the test F1 of each ``k``."""
    ranking = bank.weight[letter].topk(cfg.max_k).indices.tolist()
    y_train, y_test = train.letters == letter, test.letters == letter
    f1s = []
    for k in range(1, cfg.max_k + 1):
        probe = fit_logistic(train_codes[:, ranking[:k]], y_train)
        f1s.append(f1_score(probe.predict(test_codes[:, ranking[:k]]), y_test))
    return ranking, f1s


def absorption_scores(x: Tensor, codes: Tensor, direction: Tensor, main: list[int],
                      sae: SparseAutoencoder) -> tuple[Tensor, Tensor, Tensor]:
    """Step 4 for the words ``x: [n, d]`` (codes ``[n, M]``) of one letter: absorption fraction,
    full absorption (bool) and the latent with the largest projection, per word."""
    unit = direction / direction.norm()
    W_dec = sae.W_dec.detach().float()
    cos = F.normalize(W_dec, dim=1) @ unit
    proj = codes * (W_dec @ unit / sae.cfg.act_scale)  # π_j per word, [n, M]
    P = x.float() @ unit
    main_ids = torch.tensor(main, dtype=torch.long)
    main_proj = proj[:, main_ids].sum(1)
    allowed = (cos >= FRACTION_COS)
    allowed[main_ids] = False
    candidates = torch.where(allowed & (proj > 0), proj, torch.zeros_like(proj))
    A = candidates.topk(min(MAX_ABSORBERS, proj.shape[1]), dim=1).values.sum(1)
    absorbed = torch.minimum(A, P - main_proj)
    fraction = (absorbed / (absorbed + main_proj)).clamp(0, 1)
    fraction = torch.where(main_proj <= 0, torch.ones_like(P), fraction)
    fraction = torch.where((main_proj >= P) | (A / P < PROPORTION), torch.zeros_like(P), fraction)
    top = proj.argmax(1)
    top_proj = proj.gather(1, top[:, None]).squeeze(1)
    full = ((codes[:, main_ids] < EPS).all(1) & (cos[top] >= FULL_COS) & (P >= 0) & (top_proj / P >= PROPORTION))
    return fraction, full, top


def letter_result(letter: int, sae: SparseAutoencoder, test: SpellingSplit, test_codes: Tensor, gt: ProbeBank,
                  ranking: list[int], f1s: list[float], cfg: AbsorptionConfig, experts: Tensor | None) -> dict:
    """Steps 3-4 for one letter, as a JSON-ready row."""
    main = main_latents(ranking, f1s, cfg.f1_jump)
    found = (test.letters == letter) & (gt.scores(test.acts)[:, letter] > 0)
    row = {"letter": LETTERS[letter], "main_latents": main, "k_sparse_f1": f1s,
           "probe_true_positives": int(found.sum()), "clear_main_latent": f1s[0] >= cfg.min_probe_f1}
    if not found.any():
        return {**row, "absorption_fraction": None, "full_absorption_rate": None}
    fraction, full, top = absorption_scores(test.acts[found], test_codes[found], gt.weight[letter], main, sae)
    row.update(absorption_fraction=float(fraction.mean()), full_absorption_rate=float(full.float().mean()),
               absorbed_words=[w for w, f in zip([test.words[i] for i in found.nonzero().flatten().tolist()],
                                                 full.tolist()) if f][:20])
    if experts is not None:
        row["main_expert"] = int(experts[main[0]])
        row["full_absorptions_same_expert"] = int((experts[top[full]] == experts[main[0]]).sum())
    return row


def evaluate_absorption(sae: SparseAutoencoder, train: SpellingSplit, test: SpellingSplit, gt: ProbeBank,
                        gt_f1: list[float], cfg: AbsorptionConfig, experts: Tensor | None = None) -> dict:
    """Steps 2-4 for every letter; means over the letters whose probe F1 exceeds ``min_probe_f1``."""
    sae = sae.eval()
    train_codes, test_codes = dense_codes(sae, train.acts), dense_codes(sae, test.acts)
    bank = letter_bank(train_codes, train.letters, epochs=50, lr=1e-2, weight_decay=1e-6, l1=cfg.l1,
                       batch_size=4096)
    letters = []
    for letter in range(len(LETTERS)):
        if gt_f1[letter] <= cfg.min_probe_f1:
            continue
        ranking, f1s = k_sparse(train_codes, train, test_codes, test, cfg, letter, bank)
        letters.append(letter_result(letter, sae, test, test_codes, gt, ranking, f1s, cfg, experts))
    scored = [r for r in letters if r["absorption_fraction"] is not None]

    def mean(key: str) -> float | None:
        return sum(float(r[key]) for r in scored) / len(scored) if scored else None
    return {"letters_evaluated": len(scored), "mean_absorption_fraction": mean("absorption_fraction"),
            "mean_full_absorption_rate": mean("full_absorption_rate"),
            "mean_main_latents": sum(len(r["main_latents"]) for r in scored) / len(scored) if scored else None,
            "clear_main_latent_share": mean("clear_main_latent"), "letters": letters}


def run_absorption(runs: list[str | Path], cfg: AbsorptionConfig, model: str | None = None, progress: bool = False,
                   out: str | Path | None = None) -> dict:
    """The absorption eval of every run's SAE (all on one model and hook), on one pass of the model
    over the spelling prompts and one ground-truth probe; timings included. With ``out``, the
    results so far are written there (JSON) after each SAE."""
    from switchsae.sources.models import load_model

    loaded, model_name, hook = load_runs(runs, model)
    lm, tokenizer = load_model(model_name)
    started = time.perf_counter()
    train, test = spelling_data(lm, tokenizer, hook, cfg.words, cfg.train_fraction, cfg.icl_examples,
                                cfg.words_per_prompt, cfg.seed, cfg.batch_size, progress)
    model_s = time.perf_counter() - started
    for run in loaded:
        check_width(train.acts, hook, model_name, run.sae)
    started = time.perf_counter()
    gt, gt_f1 = ground_truth_probe(train, test)
    result: dict[str, Any] = {"settings": asdict(cfg), "model": model_name, "hook": hook.name, "train_words": len(train.words),
              "test_words": len(test.words), "model_pass_s": model_s, "probe_s": time.perf_counter() - started,
              "probe_f1": dict(zip(LETTERS, gt_f1)), "saes": {}}
    for run in loaded:
        started = time.perf_counter()
        scores = evaluate_absorption(run.sae, train, test, gt, gt_f1, cfg, expert_of_latents(run.sae))
        result["saes"][run.name] = {**scores, "arch": run.sae.cfg.arch, "width": run.sae.cfg.width,
                                    "n_experts": run.sae.cfg.n_experts, "seconds": time.perf_counter() - started}
        if out:
            save_result(out, result)
        if progress:
            print(f"absorption of {run.name}: {time.perf_counter() - started:.1f} s", flush=True)
    return result


def format_absorption(result: dict) -> str:
    """The table ``switchsae absorption`` prints."""
    good = sum(f1 > result["settings"]["min_probe_f1"] for f1 in result["probe_f1"].values())
    head = (f"first-letter absorption at {result['hook']}: {result['train_words']} train / {result['test_words']} "
            f"test words; {good} of 26 letters have a probe with test F1 > {result['settings']['min_probe_f1']}\n")
    rows = [{"sae": name, "letters": r["letters_evaluated"], "absorption fraction": r["mean_absorption_fraction"],
             "full absorption": r["mean_full_absorption_rate"], "main latents": r["mean_main_latents"],
             "clear main latent": r["clear_main_latent_share"], "seconds": r["seconds"]}
            for name, r in result["saes"].items()]
    columns = ["sae", "letters", "absorption fraction", "full absorption", "main latents", "clear main latent",
               "seconds"]
    return head + markdown_table(rows, columns)
