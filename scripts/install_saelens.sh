#!/usr/bin/env bash
# Creates the virtual environment the SAELens interop tests run in (tests/apps/test_saelens_interop.py):
# sae-lens==6.54.12 beside torch==2.13.0, outside the repository, once; and sae-dashboard==0.8.0
# without its dependencies, whose Neuronpedia data classes (plain Python and numpy) read our
# Neuronpedia export back (tests/apps/test_neuronpedia.py). Its declared dependencies (transformer-lens<3,
# safetensors<0.5, rich<14, ...) conflict with this sae-lens's, and nothing imported from it needs them.
# Idempotent: an environment that already has both at these versions is left as it is.
# Path: $SWITCHSAE_SAELENS_VENV, default ~/.cache/switchsae/saelens-venv.
set -euo pipefail
VENV="${SWITCHSAE_SAELENS_VENV:-$HOME/.cache/switchsae/saelens-venv}"
VERSION=6.54.12
DASHBOARD=0.8.0
has() { "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('$1') != '$2')" 2>/dev/null; }
if has sae-lens "$VERSION" && has sae-dashboard "$DASHBOARD"; then
    exit 0
fi
if has sae-lens "$VERSION"; then
    "$VENV/bin/python" -m pip install --quiet --no-deps "sae-dashboard==$DASHBOARD"
    exit 0
fi
python -m venv "$VENV"
# torch first, pinned: an unpinned one pulls GBs of CUDA packages.
"$VENV/bin/python" -m pip install --quiet torch==2.13.0
"$VENV/bin/python" -m pip install --quiet "sae-lens==$VERSION"
"$VENV/bin/python" -m pip install --quiet --no-deps "sae-dashboard==$DASHBOARD"
"$VENV/bin/python" -c "import sae_lens; print('sae_lens', sae_lens.__version__, 'ready in $VENV')"
