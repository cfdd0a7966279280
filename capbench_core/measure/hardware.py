"""This machine's HardwareSpec: the devices the probes found, its fingerprint and its peaks.

On CPU, peak memory bandwidth and dense matmul FLOPs are measured by a short
micro-benchmark, cached per fingerprint; accelerators take their datasheet
peaks (``analytics.datasheets``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from capbench_core.analytics.datasheets import accelerator_peaks, fingerprint
from capbench_core.contract.records import Device, HardwareSpec, Peak
from capbench_core.contract.registry import PluginManager

TRIALS = 5
BUSY_SHARE = 0.25  # other processes using more than this share of the CPUs make a measurement "busy"


def _trials(fn: Callable[[], float], trials: int = TRIALS) -> tuple[float, float]:
    """Best of ``trials`` runs, and the spread (best - worst) / best."""
    values = [fn() for _ in range(trials)]
    best = max(values)
    return best, (best - min(values)) / best if best else 0.0


def cpu_busy_share(seconds: float = 0.5) -> float | None:
    """Share of all CPUs busy over ``seconds`` (from /proc/stat), before capbench measures anything."""
    def sample() -> tuple[int, int] | None:
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        except (OSError, ValueError, IndexError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), idle

    first = sample()
    time.sleep(seconds)
    second = sample()
    if first is None or second is None or second[0] == first[0]:
        return None
    return 1.0 - (second[1] - first[1]) / (second[0] - first[0])


def measure_mem_bw_gbps(size_mib: int = 256, threads: int | None = None) -> tuple[float, float]:
    """Multi-threaded copy bandwidth, (read + write bytes) / seconds: (best of TRIALS, spread)."""
    import numpy as np

    threads = threads or os.cpu_count() or 1
    src = np.ones(size_mib * 1024 * 1024 // 8, dtype=np.float64)
    dst = np.empty_like(src)
    bounds = np.linspace(0, src.size, threads + 1, dtype=np.int64)
    parts = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]

    def copy(part: tuple[int, int]) -> None:
        a, b = part
        np.copyto(dst[a:b], src[a:b])

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(copy, parts))  # warm the pages

        def once() -> float:
            t0 = time.perf_counter()
            list(pool.map(copy, parts))
            return 2 * src.nbytes / (time.perf_counter() - t0) / 1e9

        return _trials(once)


def measure_matmul_tflops(n: int = 1024) -> tuple[float, float]:
    """float32 GEMM rate through numpy's BLAS (all threads): (best of TRIALS, spread)."""
    import numpy as np

    rng = np.random.default_rng(0)
    return _gemm_rate(rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32),
                      n)


def _gemm_rate(a: Any, b: Any, n: int) -> tuple[float, float]:
    """TFLOP/s of ``a @ b`` (n x n), four products per trial after one warm-up: (best, spread)."""
    a @ b

    def once() -> float:
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        return 4 * 2 * n**3 / (time.perf_counter() - t0) / 1e12

    return _trials(once)


def measure_torch_matmul_tflops(dtype: str, n: int = 1024) -> tuple[float, float] | None:
    """GEMM rate of torch on the CPU for ``dtype`` (bfloat16: oneDNN's kernels); None without torch."""
    try:
        import torch
    except ImportError:
        return None
    gen = torch.Generator().manual_seed(0)
    return _gemm_rate(torch.randn(n, n, generator=gen).to(getattr(torch, dtype)),
                      torch.randn(n, n, generator=gen).to(getattr(torch, dtype)), n)


def peaks_cache_file(fp: str) -> Path:
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("capbench")) / f"peaks-{fp}.json"


def measure_cpu_peaks() -> dict[str, Any]:
    """Run every CPU micro-benchmark once, with the conditions it ran under."""
    busy = cpu_busy_share()
    bw, bw_spread = measure_mem_bw_gbps()
    fp32, fp32_spread = measure_matmul_tflops()
    data: dict[str, Any] = {
        "mem_bw_gbps": bw, "mem_bw_spread": bw_spread, "fp32_tflops": fp32, "fp32_spread": fp32_spread,
        "trials": TRIALS, "busy_share_before": busy,
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    bf16 = measure_torch_matmul_tflops("bfloat16")
    if bf16 is not None:
        data["bf16_tflops"], data["bf16_spread"] = bf16
    return data


def is_busy(data: dict[str, Any]) -> bool:
    busy = data.get("busy_share_before")
    return busy is not None and busy > BUSY_SHARE


def cpu_peaks(fp: str, refresh: bool = False) -> tuple[Peak, dict[str, Peak]]:
    """Measured CPU peaks, cached per fingerprint. A measurement taken while other processes kept the
    CPUs busy is used for this run, labelled, and not cached: the next run measures again."""
    cache = peaks_cache_file(fp)
    data: dict[str, Any] | None = None
    if cache.is_file() and not refresh:
        try:
            data = json.loads(cache.read_text())
        except (OSError, ValueError):
            data = None
    if data is None or "trials" not in data:
        data = measure_cpu_peaks()
        if not is_busy(data):
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(data))
    return _peaks_from(data)


def _peaks_from(data: dict[str, Any]) -> tuple[Peak, dict[str, Peak]]:
    busy = data.get("busy_share_before")
    conditions = (f"best of {data['trials']} trials at {data['measured_at']}, CPUs "
                  f"{'?' if busy is None else f'{busy:.0%}'} busy before")
    if is_busy(data):
        conditions += " (busy: not cached, measured again next run)"

    def peak(value: float, spread: float, what: str) -> Peak:
        return Peak(value=round(value, 4), source="measured",
                    note=f"micro-benchmark on this machine: {what}; {conditions}; spread {spread:.0%}")

    bw = peak(data["mem_bw_gbps"], data["mem_bw_spread"], "multi-threaded copy")
    bw = Peak(value=round(data["mem_bw_gbps"], 2), source="measured", note=bw.note)
    flops = {"float32": peak(data["fp32_tflops"], data["fp32_spread"], "numpy SGEMM")}
    if "bf16_tflops" in data:
        flops["bfloat16"] = peak(data["bf16_tflops"], data["bf16_spread"], "torch bfloat16 GEMM")
    else:
        flops["bfloat16"] = Peak(source="unknown", note="bf16 GEMM peak needs torch to measure (capbench[torch])")
    return bw, flops


def build_spec(devices: list[Device], refresh_peaks: bool = False) -> HardwareSpec:
    """Assemble the HardwareSpec from probed devices; CPU peaks are measured."""
    cpus = [d for d in devices if d.kind == "cpu"]
    cpu = cpus[0] if cpus else Device(kind="cpu", vendor="unknown", model="unknown CPU", count=1)
    cores = int(cpu.details.get("cores", os.cpu_count() or 1))
    host_mem = int(cpu.memory_bytes or 0)
    fp = fingerprint(devices, cpu.model, host_mem)
    accel = [d for d in devices if d.kind != "cpu"]
    cpu_bw, cpu_flops = cpu_peaks(fp, refresh_peaks)
    bw, flops, compute = (*accelerator_peaks(accel[0]), accel[0].model) if accel else (cpu_bw, cpu_flops, "cpu")
    return HardwareSpec(devices=devices, cpu_model=cpu.model, cpu_cores=cores, host_memory_bytes=host_mem,
                        fingerprint=fp, peak_mem_bw_gbps=bw, peak_flops_tflops=flops, compute_device=compute,
                        cpu_peak_mem_bw_gbps=cpu_bw, cpu_peak_flops_tflops=cpu_flops)


def detect_hardware(pm: PluginManager, refresh_peaks: bool = False) -> HardwareSpec:
    """Every registered probe's devices, with peaks (CPU peaks measured once per machine and cached)."""
    devices = [d for _, probe in pm.hardware_probes.items() for d in probe()]
    return build_spec(devices, refresh_peaks)


def free_host_memory() -> int | None:
    """Bytes of host memory available to a new process now (MemAvailable), None where /proc is not Linux's."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
