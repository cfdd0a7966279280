"""Built-in llama.cpp backends: `llamacpp` in-process (llama-cpp-python) and `llamacpp_server`
(llama.cpp's own C++ llama-server, built by `capbench engines install llama.cpp`).

llama_cpp is imported only when a backend starts.
"""

from __future__ import annotations

from capbench_core import hookimpl
from capbench_core.contract.registry import BackendRegistry, EngineRegistry
from capbench_llamacpp.backend import LlamaCppBackend
from capbench_llamacpp.server import LlamaCppRecipe, LlamaCppServerBackend


@hookimpl
def register_backends(register: BackendRegistry) -> None:
    register.add_backend(LlamaCppBackend())
    register.add_backend(LlamaCppServerBackend())


@hookimpl
def register_engines(register: EngineRegistry) -> None:
    register.add_engine(LlamaCppRecipe())
