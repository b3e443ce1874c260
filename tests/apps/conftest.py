"""A tiny real pipeline for the app tests: a random Llama, a cache of real text, a trained Switch SAE
and its feature pages. The tokenizer, model folder and corpus fixtures are those of the source tests."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SOURCES = Path(__file__).resolve().parents[1] / "sources"
sys.path.insert(0, str(SOURCES))  # tiny_lm, imported by the source tests' conftest
_spec = importlib.util.spec_from_file_location("sources_conftest", SOURCES / "conftest.py")
_sources = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_sources)
tokenizer, llama_dir, wiki_corpus = _sources.tokenizer, _sources.llama_dir, _sources.wiki_corpus

CONTEXT = 32


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory, llama_dir, wiki_corpus) -> Path:
    """6,000 rows of the tiny Llama's layer-1 residual stream over real Wikipedia text."""
    from switchsae.sources.cache import build_cache

    return build_cache(str(llama_dir), "blocks.1.hook_resid_post", wiki_corpus, 6000,
                       tmp_path_factory.mktemp("apps") / "cache", context_length=CONTEXT, progress=False)


@pytest.fixture(scope="session")
def switch_run(tmp_path_factory, tiny_cache) -> Path:
    """A Switch SAE (256 latents, 4 experts, k = 4) trained 30 steps on the tiny cache."""
    from switchsae.cli import main

    run = tmp_path_factory.mktemp("apps") / "switch"
    main(["train", "--acts", str(tiny_cache), "--arch", "switch", "--width", "256", "--experts", "4", "--k", "4",
          "--steps", "30", "--batch-size", "256", "--normalize", "--out", str(run), "--quiet"])
    return run


@pytest.fixture(scope="session")
def pages_dir(tmp_path_factory, switch_run, tiny_cache) -> Path:
    """The feature pages of ``switch_run`` on ``tiny_cache`` (small batches: several per pass)."""
    from switchsae.apps.config import InspectConfig
    from switchsae.apps.inspect import inspect_run

    return inspect_run(switch_run, tiny_cache, tmp_path_factory.mktemp("apps") / "pages",
                       InspectConfig(batch_size=700), progress=False)
