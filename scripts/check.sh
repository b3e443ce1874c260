#!/usr/bin/env bash
# Static checks (CI runs them before the tests): ruff on everything, mypy on the package; both
# configured in pyproject.toml and installed with the test extras (scripts/install.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m ruff check .
python -m mypy
