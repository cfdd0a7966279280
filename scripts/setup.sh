#!/usr/bin/env bash
# Create .venv with a CPU build of PyTorch and capbench (editable) with its test extras, then the engine
# environments capbench compares: vLLM's CPU build, SGLang's CPU path and llama.cpp's llama-server, each in
# its own virtualenv or build under the user data directory (`capbench engines list` shows them).
# Safe to re-run: what is already installed is kept. CAPBENCH_SKIP_ENGINES=1 skips the engines.
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
  echo "                this compiles llama.cpp from source (about 5 min on 2 cores; cached afterwards)"
fi
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}"
echo "capbench setup: installing capbench and its extras (torch, llamacpp, lmeval, test)"
pip install -e ".[torch,llamacpp,lmeval,test]"
if [ "${CAPBENCH_SKIP_ENGINES:-0}" != "1" ]; then
  # llama.cpp compiles (both cores) while vLLM and SGLang install (mostly downloads and unpacking).
  echo "capbench setup: engine environments (first time about 15 min on 2 cores; reused afterwards)"
  .venv/bin/capbench engines install llama.cpp > .venv/llama.cpp-install.out 2>&1 &
  build=$!
  .venv/bin/capbench engines install vllm
  .venv/bin/capbench engines install sglang
  if ! wait "$build"; then
    cat .venv/llama.cpp-install.out >&2
    exit 1
  fi
  cat .venv/llama.cpp-install.out
fi
echo "capbench setup: done (.venv/bin/capbench)"
