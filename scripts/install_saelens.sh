#!/usr/bin/env bash
# Creates the virtual environment the SAELens interop tests run in (tests/apps/test_saelens_interop.py):
# sae-lens==6.54.12 beside torch==2.13.0, outside the repository, once. Idempotent: an
# environment that already has that sae-lens installed is left as it is.
# Path: $SWITCHSAE_SAELENS_VENV, default ~/.cache/switchsae/saelens-venv.
set -euo pipefail
VENV="${SWITCHSAE_SAELENS_VENV:-$HOME/.cache/switchsae/saelens-venv}"
VERSION=6.54.12
if "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('sae-lens') != '$VERSION')" 2>/dev/null; then
    exit 0
fi
python -m venv "$VENV"
# torch first, pinned: an unpinned one pulls GBs of CUDA packages.
"$VENV/bin/python" -m pip install --quiet torch==2.13.0
"$VENV/bin/python" -m pip install --quiet "sae-lens==$VERSION"
"$VENV/bin/python" -c "import sae_lens; print('sae_lens', sae_lens.__version__, 'ready in $VENV')"
