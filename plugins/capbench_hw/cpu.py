"""Host CPU probe: model, cores, sockets, memory and ISA features from /proc (Linux)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

from capbench_core.contract.records import Device

ISA_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "neon", "sve")


def _cpuinfo() -> list[dict[str, str]]:
    path = Path("/proc/cpuinfo")
    if not path.is_file():
        return []
    blocks: list[dict[str, str]] = [{}]
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            blocks.append({})
            continue
        key, _, value = line.partition(":")
        blocks[-1][key.strip()] = value.strip()
    return [b for b in blocks if b]


def _mem_total_bytes() -> int:
    path = Path("/proc/meminfo")
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


def probe_cpu() -> list[Device]:
    info = _cpuinfo()
    first = info[0] if info else {}
    model = first.get("model name") or first.get("Model") or platform.processor() or "unknown CPU"
    sockets = len({b.get("physical id", "0") for b in info}) or 1
    flags = set((first.get("flags") or first.get("Features") or "").split())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    vendor = first.get("vendor_id", platform.machine())
    return [Device(kind="cpu", vendor=vendor, model=model, count=sockets, memory_bytes=_mem_total_bytes(),
                   details={"cores": cores, "logical_cpus": os.cpu_count() or cores,
                            "arch": platform.machine(), "isa": sorted(flags.intersection(ISA_FLAGS))})]
