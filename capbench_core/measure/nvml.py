"""NVIDIA GPUs through NVML (package nvidia-ml-py): the probe the hardware plugin registers, and what the
core asks of NVML itself (which GPUs are visible, what an engine install builds for). [] when NVML or a GPU
is absent.

Per device kind: name as NVML reports it (matched against the datasheet table),
count, memory, power limit, driver and CUDA versions, and NVLink links up.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from capbench_core.contract.records import Device


def _nvlinks(pynvml: Any, handle: Any) -> int:
    up = 0
    for link in range(18):  # NVML_NVLINK_MAX_LINKS on current parts
        try:
            up += int(pynvml.nvmlDeviceGetNvLinkState(handle, link) == pynvml.NVML_FEATURE_ENABLED)
        except Exception:  # link not present / not supported: stop counting
            break
    return up


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
        cuda = pynvml.nvmlSystemGetCudaDriverVersion()
        common = {"driver": pynvml.nvmlSystemGetDriverVersion(), "cuda": f"{cuda // 1000}.{cuda % 1000 // 10}"}
        units: list[tuple[str, int, int, int]] = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else name
            try:
                limit_w = int(pynvml.nvmlDeviceGetPowerManagementLimit(handle)) // 1000
            except Exception:  # not supported on every board
                limit_w = 0
            units.append((name, int(pynvml.nvmlDeviceGetMemoryInfo(handle).total), limit_w, _nvlinks(pynvml, handle)))
        return [Device(kind="gpu", vendor="NVIDIA", model=name, count=n, memory_bytes=mem,
                       details={**common, "power_limit_w": limit_w or None, "nvlinks_up": links})
                for (name, mem, limit_w, links), n in Counter(units).items()]
    finally:
        pynvml.nvmlShutdown()


def cuda_gpus() -> list[tuple[str, int]]:
    """(name, memory bytes) of each visible NVIDIA GPU; [] when none or no NVML."""
    return [(d.model, d.memory_bytes or 0) for d in probe_nvidia() for _ in range(d.count)]


def free_gpu_memory() -> list[int]:
    """Free bytes on each visible NVIDIA GPU now, in NVML's order; [] when none or no NVML."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver or no device
        return []
    try:
        return [int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).free)
                for i in range(pynvml.nvmlDeviceGetCount())]
    finally:
        pynvml.nvmlShutdown()


def gpu_memory_of(pids: list[int]) -> int | None:
    """GPU memory (bytes, all visible GPUs) held by these processes as NVML lists them; None without NVML or
    when the driver does not report per-process memory."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver or no device
        return None
    wanted, total, seen = set(pids), 0, False
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid in wanted and proc.usedGpuMemory is not None:
                    total += int(proc.usedGpuMemory)
                    seen = True
    except Exception:  # per-process accounting unsupported (e.g. inside some containers)
        return None
    finally:
        pynvml.nvmlShutdown()
    return total if seen else None
