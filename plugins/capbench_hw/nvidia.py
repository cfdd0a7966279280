"""NVIDIA probe through NVML (package nvidia-ml-py); returns [] when NVML is absent."""

from __future__ import annotations

from collections import Counter
from typing import Any

from capbench_core.results import Device


def probe_nvidia() -> list[Device]:
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver or no device: not an error for a probe
        return []
    try:
        units: list[tuple[str, int]] = []
        details: dict[str, Any] = {"driver": pynvml.nvmlSystemGetDriverVersion()}
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else name
            units.append((name, int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)))
        return [Device(kind="gpu", vendor="NVIDIA", model=name, count=n, memory_bytes=mem, details=details)
                for (name, mem), n in Counter(units).items()]
    finally:
        pynvml.nvmlShutdown()
