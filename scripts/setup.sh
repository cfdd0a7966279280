#!/usr/bin/env bash
# Create .venv with a CPU build of PyTorch and capbench (editable) with its test extras, then the engine
# environments capbench compares: vLLM's CPU build, SGLang's CPU path and llama.cpp's llama-server, each in
# its own virtualenv or build under the user data directory (`capbench engines list` shows them).
# Safe to re-run: what is already installed is kept. CAPBENCH_SKIP_ENGINES=1 skips the engines.
#
# llama.cpp is compiled once: the llama.cpp engine builds its shared libraries with llama-server, and
# capbench's own llama-cpp-python (the in-process `llamacpp` backend, same llama.cpp revision) is installed
# from the sdist that engine keeps, without its own build, loading those libraries.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "capbench setup: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
have() { .venv/bin/python -c "import $1" 2>/dev/null; }
# torch first, pinned: an unpinned requirement would pull a multi-GB CUDA build.
if ! have torch; then
  echo "capbench setup: installing torch==2.13.0 (CPU)"
  pip install "torch==2.13.0"
fi
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}"
EXTRAS="torch,llamacpp,lmeval,test"
if [ "${CAPBENCH_SKIP_ENGINES:-0}" != "1" ]; then
  echo "capbench setup: installing capbench and its extras (torch, lmeval, test)"
  pip install -e ".[torch,lmeval,test]"
  # llama.cpp compiles (both cores) while vLLM and SGLang install (mostly downloads and unpacking).
  echo "capbench setup: engine environments (first time about 8 min on 2 cores; reused afterwards)"
  .venv/bin/capbench engines install llama.cpp > .venv/llama.cpp-install.out 2>&1 &
  build=$!
  .venv/bin/capbench engines install vllm
  .venv/bin/capbench engines install sglang
  if ! wait "$build"; then
    cat .venv/llama.cpp-install.out >&2
    exit 1
  fi
  cat .venv/llama.cpp-install.out
  engine=$(.venv/bin/python -c "from capbench_core.serving.environments import home; print(home('llama.cpp'))")
  sdist=$(ls "$engine"/llama_cpp_python-*.tar.gz 2>/dev/null | head -n 1 || true)
  if ! have llama_cpp && [ -n "$sdist" ] && ls "$engine"/bin/libllama.so* > /dev/null 2>&1; then
    echo "capbench setup: installing llama-cpp-python on the llama.cpp engine's libraries"
    CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" pip install --no-cache-dir "$sdist"
    # llama_cpp cannot be imported before its libraries are there; find its folder without importing it.
    lib=$(.venv/bin/python -c "import importlib.util as u, pathlib as p; \
print(p.Path(u.find_spec('llama_cpp').origin).parent / 'lib')")
    mkdir -p "$lib"
    cp -P "$engine"/bin/lib*.so* "$lib"/
    if ! have llama_cpp; then
      echo "capbench setup: llama-cpp-python does not load the engine's libraries; compiling its own instead"
      pip uninstall -y llama-cpp-python
    fi
  fi
elif ! have llama_cpp; then
  echo "capbench setup: installing llama-cpp-python — on a machine without its wheel in pip's cache"
  echo "                this compiles llama.cpp from source (about 5 min on 2 cores; cached afterwards)"
fi
echo "capbench setup: installing capbench and its extras (${EXTRAS//,/, })"
pip install -e ".[$EXTRAS]"
echo "capbench setup: done (.venv/bin/capbench)"
