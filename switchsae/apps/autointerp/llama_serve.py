"""The local LLM server process (``python -m switchsae.apps.autointerp.llama_serve ARGS``):
llama-cpp-python's OpenAI-compatible server, taking the same ARGS, with llama.cpp's extra CPU
buffer types turned off, so that the weights stay in plain CPU buffers and are not repacked for the
AMX or AVX-512 kernels.

With them on, llama.cpp as built by ``scripts/install_llm.sh`` (llama-cpp-python 0.3.36) segfaults
in ``decode`` on an Intel Xeon host with AMX on any prompt longer than one token (the embedded Q4_1
GGUF goes to the AMX buffer there); plain buffers decode correctly on every host. The server exposes
no setting for ``llama_model_params.use_extra_bufts`` (llama.cpp's own server calls it
``--no-repack``), so this entry point sets it in the default parameters every model is loaded with.
"""
from __future__ import annotations

import llama_cpp.llama_cpp as llama_c
from llama_cpp.server.__main__ import main

_library_defaults = llama_c.llama_model_default_params


def plain_buffer_model_params() -> llama_c.llama_model_params:
    """llama.cpp's default model parameters with ``use_extra_bufts = False``."""
    params = _library_defaults()
    params.use_extra_bufts = False
    return params


if __name__ == "__main__":
    llama_c.llama_model_default_params = plain_buffer_model_params
    main()
