"""The evals tests reuse the app tests' tiny pipeline (a random Llama, real text) and add a labelled
jsonl of real Wikipedia summaries with their topics, and a cache of it."""
from __future__ import annotations

import importlib.util
import json
import sys
from itertools import islice
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS / "sources"))  # tiny_lm, imported by the source tests' conftest
_spec = importlib.util.spec_from_file_location("apps_conftest", TESTS / "apps" / "conftest.py")
_apps = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_apps)
tokenizer, llama_dir, wiki_corpus = _apps.tokenizer, _apps.llama_dir, _apps.wiki_corpus

from tiny_lm import WIKI  # noqa: E402

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="session")
def topic_jsonl(tmp_path_factory) -> Path:
    """The first 600 Wikipedia summaries of the shared data, with their topics."""
    path = tmp_path_factory.mktemp("labelled") / "topics.jsonl"
    with WIKI.open(encoding="utf-8") as handle:
        path.write_text("".join(islice(handle, 600)))
    return path


@pytest.fixture(scope="session")
def topic_cache(tmp_path_factory, llama_dir, topic_jsonl) -> Path:
    """The tiny Llama's layer-1 residual stream over the first ~120 documents of ``topic_jsonl``
    (windows of 64 tokens)."""
    from switchsae.sources.cache import build_cache

    return build_cache(str(llama_dir), HOOK, topic_jsonl, 24_000, tmp_path_factory.mktemp("labelled") / "cache",
                       context_length=64, progress=False)


@pytest.fixture(scope="session")
def topic_runs(tmp_path_factory, topic_cache) -> dict[str, Path]:
    """A TopK SAE and a 4-expert Switch SAE (128 latents, k = 4) trained 20 steps on ``topic_cache``."""
    from switchsae.cli import main

    runs = {}
    for arch, extra in (("topk", []), ("switch", ["--experts", "4"])):
        runs[arch] = tmp_path_factory.mktemp("labelled") / arch
        main(["train", "--acts", str(topic_cache), "--arch", arch, "--width", "128", "--k", "4", "--steps", "20",
              "--batch-size", "256", "--normalize", "--out", str(runs[arch]), "--quiet", *extra])
    return runs


def topics_of(path: Path) -> list[str]:
    return [json.loads(line)["topic"] for line in path.open()]
