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
if ! .venv/bin/python -c "import llama_cpp" 2>/dev/null; then
  echo "capbench setup: installing llama-cpp-python — on a machine without its wheel in pip's cache"
  echo "                this compiles llama.cpp from source (about 15-20 min on 2 cores; cached afterwards)"
fi
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}"
echo "capbench setup: installing capbench and its extras (torch, llamacpp, lmeval, test)"
pip install -e ".[torch,llamacpp,lmeval,test]"
echo "capbench setup: done (.venv/bin/capbench)"
