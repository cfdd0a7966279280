"""The accelerator datasheet and hardware identity.

The fingerprint hashes the canonical device list (accelerator model x count +
memory, CPU model, host memory rounded to GiB): the leaderboard only compares
runs with equal fingerprints. Datasheet rows (``data/accelerators.json``) are
each sourced; a device no row matches has unknown peaks, never guessed ones.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from capbench_core.contract.records import Device, Peak

GIB = 1024**3
DATA = Path(__file__).resolve().parent.parent / "data"


def fingerprint(devices: Iterable[Device], cpu_model: str, host_memory_bytes: int) -> str:
    accel = sorted(
        (d.vendor, d.model, d.count, round((d.memory_bytes or 0) / GIB)) for d in devices if d.kind != "cpu")
    canonical = {"accelerators": accel, "cpu_model": cpu_model,
                 "host_memory_gib": round(host_memory_bytes / GIB)}
    digest = hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()
    return digest[:16]


def datasheet() -> list[dict[str, Any]]:
    """The accelerator table shipped in capbench_core/data/accelerators.json (each row sourced)."""
    path = DATA / "accelerators.json"
    rows: list[dict[str, Any]] = json.loads(path.read_text())["accelerators"]
    return rows


def match_accelerator(reported_name: str) -> dict[str, Any] | None:
    """The datasheet row for a device name as NVML reports it (e.g. 'NVIDIA H100 80GB HBM3'), or None."""
    hits = [row for row in datasheet() if re.search(row["match"], reported_name.strip())]
    return hits[0] if len(hits) == 1 else None


def accelerator_peaks(device: Device) -> tuple[Peak, dict[str, Peak]]:
    """Datasheet peaks for an accelerator, summed over its count; unknown -> null with the reason."""
    row = match_accelerator(device.model)
    if row is None:
        reason = (f"no datasheet entry matches {device.model!r}; peaks are unknown "
                  f"(add a sourced row to capbench_core/data/accelerators.json)")
        return Peak(source="unknown", note=reason), {}
    note = f"{row['name']} x{device.count}: {row['source']}"
    bw = Peak(value=row["mem_bw_gbps"] * device.count, source="datasheet", note=note)
    flops = {dtype: Peak(value=value * device.count, source="datasheet", note=note)
             for dtype, value in row["tflops"].items()}
    return bw, flops


def hosts() -> list[dict[str, Any]]:
    """Host CPU rows (data/hosts.json): DRAM bandwidth per socket, PCIe, TDP, list price; each sourced."""
    rows: list[dict[str, Any]] = json.loads((DATA / "hosts.json").read_text())["hosts"]
    return rows


def match_host(cpu_model: str) -> dict[str, Any] | None:
    """The host row for a CPU model name as the OS reports it, or None."""
    hits = [row for row in hosts() if re.search(row["match"], cpu_model)]
    return hits[0] if len(hits) == 1 else None


def links() -> dict[str, dict[str, Any]]:
    """Link rows (data/links.json) by id: per-direction GB/s, datasheet or published measurement, sourced."""
    return {row["id"]: row for row in json.loads((DATA / "links.json").read_text())["links"]}
