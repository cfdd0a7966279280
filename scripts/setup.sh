#!/usr/bin/env bash
# Create .venv with a CPU build of PyTorch and capbench (editable) with its test extras.
# Safe to re-run: what is already installed is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "capbench setup: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
# torch first, pinned: an unpinned requirement would pull a multi-GB CUDA build.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "capbench setup: installing torch==2.13.0 (CPU)"
  pip install "torch==2.13.0"
fi
echo "capbench setup: installing capbench and its test extras"
pip install -e ".[torch,test]"
echo "capbench setup: done (.venv/bin/capbench)"
