"""capbench's start-up patches for SGLang on a CPU without sgl-kernel's CPU ops (installed by
`capbench engines install sglang` into the engine environment only; active when
CAPBENCH_SGLANG_CPU_SHIM=1, which capbench sets when it launches SGLang).

Each patch fills a gap between SGLang 0.5.23 and a CPU-only torch, with the behaviour a CPU has:
* ``torch.cpu.is_current_stream_capturing``: CPUs have no graph capture, so False.
* ``torch.cpu.empty_cache``: the CPU allocator keeps no cache to release, so nothing to do.
* PyPI's torchvision is a CUDA build whose C++ ops do not load beside the CPU torch; its
  ``_meta_registrations`` then registers fake kernels for ops that do not exist and the import
  fails ("operator torchvision::nms does not exist"). Registering a fake kernel for an op that
  does not exist is skipped (torchvision's own ``register_meta`` already does this when it has no ops).
* The shared-expert gate of Qwen2-MoE (``sglang.kernels.ops.elementwise``: sigmoid(h . w) x shared,
  optionally added to the routed output) is a Triton kernel with no CPU path ("0 active drivers"):
  its launcher is replaced, when that module is imported, by the same arithmetic in torch (in float32,
  as the kernel computes).
"""

import importlib.abc
import importlib.util
import os
import sys
from typing import Any

ELEMENTWISE = "sglang.kernels.ops.elementwise.elementwise"


def _launch_fused_gate_sigmoid_mul(hidden_states: Any, gate_weight: Any, shared_output: Any, output: Any, *,
                                   do_add: bool) -> None:
    """output[t] = sigmoid(hidden_states[t] . gate_weight) x shared_output[t] (+ output[t] when do_add)."""
    gate = (hidden_states.float() @ gate_weight.float()).sigmoid().unsqueeze(-1)
    result = gate * shared_output.float()
    if do_add:
        result += output.float()
    output.copy_(result.to(output.dtype))


class _AfterImport(importlib.abc.MetaPathFinder):
    """Patches a module right after it is first imported (before its names are imported elsewhere)."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != ELEMENTWISE:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            run(module)
            module._launch_fused_gate_sigmoid_mul = _launch_fused_gate_sigmoid_mul

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def _patch() -> None:
    import torch

    if not hasattr(torch.cpu, "is_current_stream_capturing"):
        torch.cpu.is_current_stream_capturing = lambda: False
    if not hasattr(torch.cpu, "empty_cache"):
        torch.cpu.empty_cache = lambda: None
    original = torch.library.register_fake

    def _exists(qualname: str) -> bool:
        namespace, _, name = qualname.partition("::")
        try:
            getattr(getattr(torch.ops, namespace), name.split(".")[0])
        except (AttributeError, RuntimeError):
            return False
        return True

    def register_fake(op, *args, **kwargs):  # type: ignore[no-untyped-def]
        if isinstance(op, str) and op.startswith("torchvision::") and not _exists(op):
            return args[0] if args and callable(args[0]) else (lambda fn: fn)
        return original(op, *args, **kwargs)

    torch.library.register_fake = register_fake


if os.environ.get("CAPBENCH_SGLANG_CPU_SHIM") == "1":
    _patch()
    sys.meta_path.insert(0, _AfterImport())
