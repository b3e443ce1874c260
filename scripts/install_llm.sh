#!/usr/bin/env bash
# The offline default LLM of `switchsae autointerp`: llama-cpp-python's OpenAI-compatible server,
# which serves the embedded SmolLM2-135M-Instruct GGUF on 127.0.0.1. It is an sdist that compiles
# llama.cpp (the multimodal library is left out: LLAVA_BUILD=OFF). Idempotent: an installed server
# is left as it is, and pip reuses the wheel it built before.
set -euo pipefail
VERSION=0.3.36
if python -c "import importlib.metadata as m, sys; sys.exit(m.version('llama_cpp_python') != '$VERSION')" 2>/dev/null \
    && python -c "import llama_cpp.server.app" 2>/dev/null; then
    exit 0
fi
CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
    python -m pip install --quiet "llama-cpp-python[server]==$VERSION"
