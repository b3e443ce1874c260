#!/usr/bin/env bash
# Creates the virtual environment SAEBench is tried in (README "Use", benchmarks/SAEBENCH.md):
# sae-bench==0.6.0 beside torch==2.13.0 (the CPU wheel) and the sae-lens it pulls, outside the
# repository, once. Idempotent: an environment that already has that sae-bench is left as it is.
# Path: $SWITCHSAE_SAEBENCH_VENV, default ~/.cache/switchsae/saebench-venv.
set -euo pipefail
VENV="${SWITCHSAE_SAEBENCH_VENV:-$HOME/.cache/switchsae/saebench-venv}"
VERSION=0.6.0
if "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('sae-bench') != '$VERSION')" 2>/dev/null; then
    exit 0
fi
python -m venv "$VENV"
# torch first, pinned, and kept pinned: sae-bench asks for torchvision, whose newest release
# would pull a newer torch with all its CUDA wheels.
"$VENV/bin/python" -m pip install --quiet torch==2.13.0
PIN="$(mktemp)"
echo "torch==2.13.0" > "$PIN"
"$VENV/bin/python" -m pip install --quiet "sae-bench==$VERSION" "sae-lens==6.54.12" -c "$PIN"
rm -f "$PIN"
# The torchvision pip picks for torch 2.13.0 is built for the CUDA torch; on the CPU wheel its
# import fails ("operator torchvision::nms does not exist") and breaks `import transformers`.
# Nothing SAEBench's evals run needs it.
"$VENV/bin/python" -m pip uninstall --quiet -y torchvision
"$VENV/bin/python" -c "import sae_bench, sae_lens; print('sae_bench ready in $VENV, sae_lens', sae_lens.__version__)"
