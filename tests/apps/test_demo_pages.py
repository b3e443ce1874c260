"""`switchsae demo` on the tiny Llama: it ends with the Switch SAE's feature pages, and scores both SAEs
on text of another domain when given one."""
from __future__ import annotations

import json

from tiny_lm import GUTENBERG

from switchsae.apps import pages
from switchsae.evaluate import evaluate
from switchsae.pipeline import DemoConfig, comparison, run_demo
from switchsae.saes.io import load_sae
from switchsae.sources.cache import ActivationCache


def test_the_demo_writes_and_announces_the_switch_sae_s_pages(tmp_path, llama_dir, wiki_corpus, capsys):
    cfg = DemoConfig(out=tmp_path / "demo", model=str(llama_dir), hook="blocks.1.hook_resid_post",
                     corpus=str(wiki_corpus), tokens=3000, width=32, experts=2, k=4, steps=5, batch_size=256,
                     eval_tokens=254)
    run_demo(cfg, progress=False)
    out = capsys.readouterr().out
    assert f"switchsae serve {(cfg.out / 'pages').resolve()}" in out and "index.html" in out
    meta = pages.read_data(cfg.out / "pages", pages.META)
    assert (meta["arch"], meta["width"], meta["experts"]) == ("switch", 64, 2)
    run_demo(cfg, progress=False)  # resumes: every stage, the pages included, is kept
    assert pages.read_data(cfg.out / "pages", pages.META) == meta


def test_the_demo_scores_both_saes_on_every_row_of_another_domain(tmp_path, llama_dir, wiki_corpus):
    book = sorted(GUTENBERG.glob("*.txt"))[0]
    cfg = DemoConfig(out=tmp_path / "demo", model=str(llama_dir), hook="blocks.1.hook_resid_post",
                     corpus=str(wiki_corpus), tokens=3000, width=32, experts=2, k=4, steps=5, batch_size=256,
                     eval_tokens=254, other_corpus=str(book), other_tokens=1016)
    rows = run_demo(cfg, progress=False)
    other = ActivationCache(cfg.out / "cache_other", eval_fraction=1.0, max_eval_rows=cfg.other_tokens)
    assert (other.n_train, other.n_tokens, other.manifest["corpus"]) == (0, 1016, str(book))
    for row in rows:
        saved = json.loads((cfg.out / row["run"] / "metrics_other.json").read_text())
        again = evaluate(load_sae(cfg.out / row["run"]), other.eval_batches(4096), progress=False)
        assert row["other_fvu"] == saved["fvu"] == again["fvu"] != row["fvu"]
        assert row["other_loss_recovered"] == saved["loss_recovered"] and row["other_kl_sae"] == saved["kl_sae"] > 0
        assert json.loads((cfg.out / row["run"] / "metrics.json").read_text())["fvu"] == row["fvu"]
    report = (cfg.out / "report.md").read_text()
    assert f"On {book} (another domain, 1,016 rows)" in report
    assert f"{comparison(rows)}\n\nOn {book}" in report and report.endswith(f"{comparison(rows, 'other_')}\n")


def test_the_demo_says_metric_by_metric_where_switch_is_better_and_where_worse():
    rows = [{"run": "topk", "fvu": 0.2, "dead_frac": 0.0, "loss_recovered": 0.95, "kl_sae": 0.3, "other_fvu": 0.25,
             "other_dead_frac": 0.0, "other_loss_recovered": 0.9, "other_kl_sae": 0.5},
            {"run": "switch", "fvu": 0.15, "dead_frac": 0.1, "loss_recovered": 0.96, "kl_sae": 0.300001,
             "other_fvu": 0.3, "other_dead_frac": 0.0, "other_loss_recovered": 0.89, "other_kl_sae": 0.4}]
    assert comparison(rows) == ("Switch against TopK (one seed each): fvu 0.1500 against 0.2000 (better), "
                                "dead_frac 0.1000 against 0.0000 (worse), loss_recovered 0.9600 against 0.9500 "
                                "(better), kl_sae 0.3000 against 0.3000 (level)")
    assert comparison(rows, "other_") == ("Switch against TopK (one seed each): fvu 0.3000 against 0.2500 (worse), "
                                          "dead_frac 0.0000 against 0.0000 (level), loss_recovered 0.8900 against "
                                          "0.9000 (worse), kl_sae 0.4000 against 0.5000 (better)")
