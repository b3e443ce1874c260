"""Feature absorption: main latents, the per-word scores on a case worked by hand, a planted feature
split recovered end to end, and the spelling prompts."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from switchsae.config import SAEConfig
from switchsae.evals.absorption import (AbsorptionConfig, absorption_scores, evaluate_absorption,
                                        ground_truth_probe, main_latents)
from switchsae.evals.spelling import LETTERS, SpellingSplit, spelling_prompts
from switchsae.saes import build_sae


def sae_with(W_enc: torch.Tensor, W_dec: torch.Tensor, k: int = 1):
    """A TopK SAE (no biases, act_scale 1) with the given encoder and decoder rows."""
    sae = build_sae(SAEConfig(arch="topk", d_model=W_dec.shape[1], width=W_dec.shape[0], k=k))
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.W_dec.copy_(F.normalize(W_dec, dim=1))
    return sae.eval()


def test_main_latents_grow_while_f1_jumps():
    assert main_latents([7, 3, 9], [0.5, 0.6, 0.61], jump=0.03) == [7, 3]
    assert main_latents([7, 3, 9], [0.9, 0.91, 0.99], jump=0.03) == [7]
    assert main_latents([7, 3, 9], [0.0, 0.0, 0.5], jump=0.03) == [7]  # k = 1 always counts


def test_absorption_scores_on_a_case_worked_by_hand():
    """Probe e0. Latent 0 (main) decodes e0, latent 1 decodes (e0 + e1)/√2 (cos 0.71), latent 2 e2."""
    e = torch.eye(3)
    sae = sae_with(e, torch.stack([e[0], e[0] + e[1], e[2]]))
    r2 = math.sqrt(2)
    x = torch.stack([e[0], e[0] + e[1], e[0] + e[1], e[0] + e[2]])
    codes = torch.tensor([[1.0, 0, 0],        # the main latent carries all of P = 1
                          [0, r2, 0],         # main silent, latent 1 projects 1 = P: fully absorbed
                          [0.5, r2 / 2, 0],   # half each: partial absorption, 0.5
                          [0, 0, 1.0]])       # main silent but nothing aligned fires: no absorption
    fraction, full, top = absorption_scores(x, codes, torch.tensor([2.0, 0, 0]), [0], sae)
    assert torch.allclose(fraction, torch.tensor([0.0, 1.0, 0.5, 0.0]), atol=1e-6)
    assert full.tolist() == [False, True, False, False]
    assert top[1] == 1


def planted_split(n_per_letter: int, absorbed: int, first_dim: int, seed: int) -> tuple[SpellingSplit, list[int]]:
    """Words of 26 letters in 40 dimensions: ``x = e_letter + 0.05 noise``; the first ``absorbed``
    words of 'a' also carry a token direction ``u_w`` of their own (dimension ``first_dim + w``)."""
    generator = torch.Generator().manual_seed(seed)
    n = 26 * n_per_letter
    letters = torch.arange(n) % 26
    x = torch.zeros(n, 40)
    x[torch.arange(n), letters] = 1.0
    x[:, :26] += 0.05 * torch.randn(n, 26, generator=generator)
    token_dims = []
    for w, row in enumerate((letters == 0).nonzero().flatten()[:absorbed].tolist()):
        x[row, first_dim + w] = 1.0
        token_dims.append(first_dim + w)
    words = [f" {LETTERS[c]}word{i}" for i, c in enumerate(letters.tolist())]
    return SpellingSplit(x, letters, words), token_dims


def test_a_planted_feature_split_is_measured_as_absorption():
    """Letter latents e_c; each absorbed 'a' word has a token latent (encoder 0.5 e_a + 2 u_w, decoder
    (e_a + u_w)/√2) that wins the TopK (k = 1) over the 'a' latent, which then stays silent. Every
    probe-found absorbed test word is full absorption; no other letter absorbs."""
    train, train_dims = planted_split(20, 6, first_dim=26, seed=0)
    test, test_dims = planted_split(10, 4, first_dim=32, seed=1)
    d = train.acts.shape[1]
    eye = torch.eye(d)
    enc = [eye[c] for c in range(26)] + [0.5 * eye[0] + 2 * eye[t] for t in train_dims + test_dims]
    dec = [eye[c] for c in range(26)] + [eye[0] + eye[t] for t in train_dims + test_dims]
    sae = sae_with(torch.stack(enc), torch.stack(dec))
    gt, gt_f1 = ground_truth_probe(train, test)
    assert min(gt_f1) > 0.9
    result = evaluate_absorption(sae, train, test, gt, gt_f1, AbsorptionConfig(max_k=3))
    letters = {r["letter"]: r for r in result["letters"]}
    assert result["letters_evaluated"] == 26 and letters["a"]["main_latents"] == [0]
    assert letters["a"]["full_absorption_rate"] == pytest.approx(4 / 10)
    assert letters["a"]["absorption_fraction"] == pytest.approx(4 / 10)
    assert all(letters[c]["full_absorption_rate"] == 0 for c in LETTERS[1:])
    assert result["mean_full_absorption_rate"] == pytest.approx(4 / 10 / 26)
    assert result["clear_main_latent_share"] == 1.0
    assert sorted(letters["a"]["absorbed_words"]) == sorted(test.words[i] for i in range(0, 4 * 26, 26))


class CharTokenizer:
    """A stand-in tokenizer: one id per character (the prompt builder only needs these calls)."""

    bos_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [ord(c) for c in text]}


def test_spelling_prompts_read_each_word_once_after_the_example_lines():
    tokenizer = CharTokenizer()
    words = [(1000 + i, f" {LETTERS[i % 26]}x") for i in range(70)]
    ids, positions, readers = spelling_prompts(tokenizer, words, icl_examples=4, words_per_prompt=30,
                                               generator=torch.Generator().manual_seed(0))
    assert ids.shape[0] == 3 and sorted(readers[readers >= 0].tolist()) == list(range(70))
    newline = ord("\n")
    for p in range(ids.shape[0]):
        for position, word in zip(positions[p].tolist(), readers[p].tolist()):
            if word < 0:
                continue
            assert ids[p, position] == words[word][0]
            assert int((ids[p, :position] == newline).sum()) >= 4 + 1  # the leading line break and 4 lines
            line = ids[p, position + 1:position + 1 + len(" has the first letter: X")].tolist()
            assert "".join(map(chr, line)) == " has the first letter: " + words[word][1][1].upper()
