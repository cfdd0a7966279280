"""Built-in llama.cpp backends (llama-cpp-python): `llamacpp` in-process and `llamacpp_server`.

llama_cpp is imported only when a backend starts.
"""

from __future__ import annotations

from capbench_core import hookimpl
from capbench_core.plugins import BackendRegistry
from capbench_llamacpp.backend import LlamaCppBackend, LlamaCppServerBackend


@hookimpl
def register_backends(register: BackendRegistry) -> None:
    register.add_backend(LlamaCppBackend())
    register.add_backend(LlamaCppServerBackend())
