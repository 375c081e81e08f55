#!/usr/bin/env bash
# One-time set-up on a fresh machine: a venv with the CPU build of torch (from local disk), then the package.
# Idempotent: a second run only re-checks. Never pulls a CUDA torch build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null \
  || python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
