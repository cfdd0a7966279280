"""capbench core: plugin hooks, model analytics, metrics, results and storage.

Nothing here imports an engine (torch, vllm, sglang, llama_cpp) at module level.
"""

from capbench_core.contract.hookspecs import hookimpl

__all__ = ["hookimpl", "__version__"]
__version__ = "0.1.0"
