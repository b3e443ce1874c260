"""Sparse probing: pooling, top-m selection, the balanced tasks, documents from a cache, the command."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import HOOK, topics_of

from switchsae.cli import main
from switchsae.config import SAEConfig
from switchsae.evals.cached import cached_documents
from switchsae.evals.documents import DocumentActivations, document_activations, mean_pool, pooled_codes
from switchsae.evals.labelled import binary_tasks, chunk_text, select_by_label
from switchsae.evals.probing import probe_features, top_mean_difference
from switchsae.saes import build_sae
from switchsae.saes.io import save_sae
from switchsae.sources.cache import ActivationCache
from switchsae.sources.models import load_model


def packed(lengths: list[int], d: int, seed: int = 0) -> DocumentActivations:
    generator = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    return DocumentActivations(torch.randn(total, d, generator=generator), torch.zeros(total, dtype=torch.long), offsets)


def test_mean_pool_averages_each_documents_rows():
    docs = packed([3, 1, 2], 4)
    pooled = mean_pool(docs.acts, docs)
    assert torch.allclose(pooled[0], docs.acts[:3].mean(0)) and torch.allclose(pooled[1], docs.acts[3])
    assert torch.allclose(pooled[2], docs.acts[4:].mean(0))


@pytest.mark.parametrize("arch", ["topk", "switch", "relu"])
def test_pooled_codes_equal_the_mean_of_dense_codes(arch):
    extra = {"n_experts": 4} if arch == "switch" else {}
    sae = build_sae(SAEConfig(arch=arch, d_model=8, width=32, k=3, **extra))
    docs = packed([5, 2, 7], 8, seed=1)
    dense = sae.encode(docs.acts).to_dense(32)
    expected = torch.stack([dense[a:b].mean(0) for a, b in zip(docs.offsets[:-1], docs.offsets[1:])])
    assert torch.allclose(pooled_codes(sae, docs, batch_size=4), expected, atol=1e-6)


def test_top_mean_difference_finds_the_planted_columns():
    generator = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 2 == 0
    x = torch.randn(200, 50, generator=generator)
    x[y, 11] += 3.0
    x[~y, 29] += 2.0  # a larger mean on the negatives counts too (|difference|)
    assert top_mean_difference(x, y, 2).tolist() == [11, 29]


def test_balanced_tasks_split_each_class_and_draw_as_many_negatives():
    labels = torch.tensor([0] * 30 + [1] * 50 + [2] * 20)
    for task in binary_tasks(labels, seed=3, test_fraction=0.2):
        assert not set(task.train.tolist()) & set(task.test.tolist())
        for rows, y in ((task.train, task.train_y), (task.test, task.test_y)):
            assert int(y.sum()) == int((~y).sum())
            assert bool((labels[rows[y]] == task.label).all()) and bool((labels[rows[~y]] != task.label).all())
        assert int(task.test_y.sum()) == round(0.2 * int((labels == task.label).sum()))
    assert not torch.equal(binary_tasks(labels, 0)[0].train, binary_tasks(labels, 1)[0].train)


def test_probe_on_one_planted_latent_is_perfect_at_m_1():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(300) % 3
    features = torch.rand(300, 40, generator=generator)
    features[labels == 1, 17] += 5.0
    tasks = binary_tasks(labels, seed=0)
    scores, selected = probe_features(features, tasks, (1, 2), C=1.0)
    assert scores["m=1"][1] == 1.0 and selected[1][0] == 17
    assert all(0.0 <= s <= 1.0 for values in scores.values() for s in values)


def test_selection_takes_the_largest_classes_evenly_and_refuses_bad_corpora():
    labels = ["a"] * 40 + ["b"] * 25 + ["c"] * 12
    chosen, ids, classes = select_by_label(labels, 10, max_classes=2)
    assert classes == ["a", "b"] and ids.tolist() == [0] * 10 + [1] * 10
    assert chosen[0] == 0 and chosen[9] == 39  # evenly spaced, first to last
    with pytest.raises(ValueError, match="only the class 'a'"):
        select_by_label(["a"] * 30, 10, 5)
    with pytest.raises(ValueError, match="Too few documents per class.*'c' has 12"):
        select_by_label(labels, 20, 3)


def test_chunk_text_cuts_at_words_and_undoes_line_wraps():
    text = "one two\nthree   four five\n\nsix seven eight nine ten"
    chunks = chunk_text(text, 12)
    assert chunks == ["one two three", "four five six", "seven eight", "nine ten"]
    assert chunk_text("alpha beta gamma delta x", 11) == ["alpha beta", "gamma delta"]  # short tail dropped


def test_cached_documents_are_the_labelled_articles(topic_cache, topic_jsonl, tokenizer):
    cache = ActivationCache(topic_cache)
    acts, labels, classes = cached_documents(cache, "wiki-topic", 10, 3, context_length=64, data=topic_jsonl)
    assert acts.n_docs == 30 and classes[0] == "People" and acts.acts.dtype == torch.bfloat16
    articles = [(tokenizer(json.loads(line)["text"], add_special_tokens=False)["input_ids"], topic)
                for line, topic in zip(topic_jsonl.open(), topics_of(topic_jsonl))]
    for d in range(acts.n_docs):  # each document is the start of an article of its class's topic
        ids = acts.token_ids[acts.offsets[d]:acts.offsets[d + 1]].tolist()
        assert classes[labels[d]] in {topic for article, topic in articles if article[:len(ids)] == ids}
    assert int(acts.offsets.diff().max()) <= 63


def test_a_fresh_pass_matches_the_cache_on_the_first_article(topic_cache, topic_jsonl, llama_dir):
    cache = ActivationCache(topic_cache)
    model, tokenizer = load_model(str(llama_dir))
    text = json.loads(topic_jsonl.open().readline())["text"]
    fresh = document_activations(model, tokenizer, HOOK, [text, text[:50]], context_length=64, dtype=torch.float32)
    n = int(fresh.offsets[1])
    assert torch.allclose(fresh.acts[:n], cache.read(0, n), atol=1e-2, rtol=1e-2)  # the cache stores bf16


def test_probe_command_writes_every_score(topic_runs, topic_cache, topic_jsonl, tmp_path, capsys):
    out = tmp_path / "probe.json"
    main(["probe", str(topic_runs["topk"]), str(topic_runs["switch"]), "--acts", str(topic_cache), "--data",
          str(topic_jsonl), "--docs-per-class", "10", "--max-classes", "3", "--seeds", "2", "--context-length", "64",
          "--out", str(out), "--quiet"])
    printed = capsys.readouterr().out
    assert "raw activations" in printed and "topk" in printed and "m=20" in printed
    result = json.loads(out.read_text())
    assert set(result["features"]) == {"raw activations", "topk", "switch"}
    for scores in result["features"].values():
        assert len(scores["accuracy"]["m=1"]) == 2 and len(scores["accuracy_per_class"]["all"][0]) == 3
        assert all(0 <= a <= 1 for values in scores["accuracy"].values() for a in values)
    experts = result["features"]["switch"]["experts"]
    assert all(abs(sum(row) - 1) < 1e-5 for row in experts["selected_share"])
    assert len(experts["accuracy_m=5_per_expert"]) == 4


def _error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1
    return message


def test_bad_labelled_corpora_are_one_line_errors(topic_runs, tmp_path, capsys):
    one_class = tmp_path / "one.jsonl"
    one_class.write_text("".join(json.dumps({"text": f"Article {i}.", "topic": "Arts"}) + "\n" for i in range(30)))
    run = str(topic_runs["topk"])
    assert "has only the class 'Arts'" in _error(capsys, ["probe", run, "--data", str(one_class), "--quiet"])
    few = tmp_path / "few.jsonl"
    few.write_text("".join(json.dumps({"text": f"Article {i}.", "topic": "Arts" if i % 5 else "History"}) + "\n"
                           for i in range(60)))
    message = _error(capsys, ["probe", run, "--data", str(few), "--docs-per-class", "20", "--quiet"])
    assert "Too few documents per class" in message and "'History' has 12" in message


def test_a_model_or_hook_mismatch_is_a_one_line_error(topic_runs, topic_cache, topic_jsonl, llama_dir, tmp_path, capsys):
    run = str(topic_runs["topk"])
    message = _error(capsys, ["probe", run, "--acts", str(topic_cache), "--model", str(tmp_path), "--quiet"])
    assert "does not match" in message
    narrow = tmp_path / "narrow"
    save_sae(build_sae(SAEConfig(arch="topk", d_model=16, width=32, k=2, hook_name=HOOK, model_name=str(llama_dir))),
             narrow)
    message = _error(capsys, ["probe", str(narrow), "--data", str(topic_jsonl), "--docs-per-class", "10",
                              "--max-classes", "2", "--quiet"])
    assert "is 32 wide, but the SAE reads 16-wide" in message
    message = _error(capsys, ["probe", run, str(narrow), "--acts", str(topic_cache), "--quiet"])
    assert "read different activations" in message
