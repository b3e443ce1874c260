"""`switchsae demo` ends with the Switch SAE's feature pages (here on the tiny Llama)."""
from __future__ import annotations

from switchsae.apps import pages
from switchsae.pipeline import DemoConfig, run_demo


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
