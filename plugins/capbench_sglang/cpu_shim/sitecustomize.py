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
"""

import os


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
