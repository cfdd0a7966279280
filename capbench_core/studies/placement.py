"""`capbench study placement`: for one model on one machine, what each way of placing the experts moves over
each resource, which resource bounds the decode step, the tokens/s that bound allows, the memory each device
needs and what a million tokens cost (``analytics.placement``, a bound, not a measurement).

The machine is an accelerator datasheet row x N devices with a host (CPU sockets from data/hosts.json) and the
links of data/links.json; or ``here`` (this machine, CPU only, with its measured peaks). The placements
compared are those the machine allows: everything on the device; the routed experts in host memory computed by
the CPU, or fetched over PCIe; the experts spread over the N devices by expert parallelism over NVLink or
InfiniBand; and llama.cpp's ``--n-cpu-moe N`` ladder.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from capbench_core.analytics.cost import rows_for
from capbench_core.analytics.datasheets import datasheet, hosts, links
from capbench_core.analytics.model_spec import ModelSpec
from capbench_core.analytics.placement import Placement, System, step_model
from capbench_core.analytics.weights import DTYPE_BYTES
from capbench_core.config import describe_errors
from capbench_core.contract.records import HardwareSpec
from capbench_core.errors import CapbenchError, find_name

DEFAULT_HOST = "Xeon Platinum 8480+"  # the host of NVIDIA's DGX H100 (2 sockets)
NVLINK_DOMAIN = 8  # GPUs one HGX board's NVLink switches connect; EP beyond it crosses nodes


class PlacementConfig(BaseModel):
    """The settings of `capbench study placement` (its flags, same names)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    hardware: str = "here"
    devices: int = Field(default=1, ge=1)
    host: str = DEFAULT_HOST
    sockets: int = Field(default=2, ge=1)
    batch: list[int] = Field(default_factory=lambda: [1, 16, 64])
    context: int = Field(default=4096, ge=0)
    dtype: str = "bfloat16"
    ep_link: str = "ib-ndr"
    experts_per_layer: float | None = Field(default=None, gt=0)

    @classmethod
    def build(cls, settings: dict[str, Any]) -> PlacementConfig:
        try:
            config = cls.model_validate({k: v for k, v in settings.items() if v is not None})
        except ValidationError as exc:
            raise CapbenchError(describe_errors(exc)) from None
        if config.dtype not in DTYPE_BYTES:
            raise CapbenchError(f"--dtype {config.dtype!r}: bytes per weight unknown (known: {', '.join(DTYPE_BYTES)})")
        return config


def system_named(config: PlacementConfig, hw: HardwareSpec | None) -> System:
    """The machine of the study: ``here`` (CPU only, measured peaks) or a datasheet accelerator x N with a host."""
    if config.hardware == "here":
        if hw is None or hw.cpu_peak_mem_bw_gbps is None or hw.cpu_peak_mem_bw_gbps.value is None:
            raise CapbenchError("this machine's memory bandwidth is not measured; name an accelerator with --hardware")
        flops = hw.cpu_peak_flops_tflops.get("float32")
        return System(f"here: {hw.cpu_model} ({hw.cpu_cores} cores)", 0, float(hw.cpu_peak_mem_bw_gbps.value),
                      flops.value if flops else None, hw.host_memory_bytes / 1e9,
                      sources={"host_dram": f"measured ({hw.cpu_peak_mem_bw_gbps.source})"})
    rows = {str(r["name"]): r for r in datasheet()}
    row = rows[find_name("hardware", config.hardware, list(rows))]
    host_rows = {str(h["name"]): h for h in hosts()}
    host = host_rows[find_name("host CPU", config.host, list(host_rows))]
    link_rows = links()
    ib = link_rows[find_name("link", config.ep_link, [k for k, v in link_rows.items() if v["kind"] == "infiniband"])]
    pcie = link_rows.get(str(row.get("pcie"))) if row.get("pcie") else None
    nvlink = link_rows.get(str(row.get("nvlink"))) if row.get("nvlink") else None
    prices = rows_for(str(row["name"]))
    price = prices[0] if prices else None
    dtype = config.dtype if config.dtype in row["tflops"] else "bfloat16"
    return System(
        f"{config.devices} x {row['name']}, {config.sockets} x {host['name']}", config.devices,
        host_dram_gbps=float(host["dram_gbps_per_socket"]) * config.sockets, host_tflops=None,
        device_mem_gbps=float(row["mem_bw_gbps"]), device_tflops=row["tflops"].get(dtype),
        device_memory_gb=float(row["memory_gb"]), pcie_gbps=float(pcie["gbps"]) if pcie else None,
        nvlink_gbps=float(nvlink["gbps"]) if nvlink else None, infiniband_gbps=float(ib["gbps"]),
        usd_per_hour=price.usd_per_hour / price.gpus * config.devices if price else None,
        price_source=price.label() if price else f"no price-table row for {row['name']}",
        sources={"device": str(row["source"]), "host": str(host["source"]),
                 "pcie": str(pcie["source"]) if pcie else "unknown", "nvlink": str(nvlink["source"]) if nvlink else
                 "none", "infiniband": str(ib["source"])})


def placements(spec: ModelSpec, system: System) -> list[Placement]:
    """The placements this machine allows for this model: with several devices, the non-EP placements split
    every weight by tensor parallelism over all of them."""
    if system.devices == 0:
        return [Placement("all in host memory (CPU)")]
    n = system.devices
    tp = f"TP{n}, " if n > 1 else ""
    out = [Placement(f"{tp}all on device", tp=n),
           Placement(f"{tp}experts on host, CPU computes", "host_compute", tp=n),
           Placement(f"{tp}experts on host, fetched over PCIe", "host_fetch", tp=n)]
    if n > 1:
        if system.nvlink_gbps and n <= NVLINK_DOMAIN:
            out.append(Placement(f"EP{n} over NVLink", ep=n, ep_link="nvlink"))
        out.append(Placement(f"EP{n} over InfiniBand", ep=n, ep_link="infiniband"))
    layers = spec.moe_layers
    step = max(1, layers // 4)
    for k in range(step, layers, step):
        out.append(Placement(f"{tp}--n-cpu-moe {k}", "host_compute", host_layers=k, tp=n))
    return out


def run_placement_study(config: PlacementConfig, spec: ModelSpec, hw: HardwareSpec | None) -> dict[str, Any]:
    system = system_named(config, hw)
    rows = []
    for placement in placements(spec, system):
        for batch in config.batch:
            rows.append(step_model(spec, placement, system, batch, config.context, config.dtype,
                                   experts_per_layer=config.experts_per_layer).record())
    return {"model": spec.name, "architecture": spec.architecture, "dtype": config.dtype, "context": config.context,
            "batches": config.batch, "weights_gb": spec.weight_bytes(config.dtype) / 1e9,
            "system": {"name": system.name, "devices": system.devices, "device_mem_gbps": system.device_mem_gbps,
                       "device_memory_gb": system.device_memory_gb, "host_dram_gbps": system.host_dram_gbps,
                       "pcie_gbps": system.pcie_gbps, "nvlink_gbps": system.nvlink_gbps,
                       "infiniband_gbps": system.infiniband_gbps, "usd_per_hour": system.usd_per_hour,
                       "price_source": system.price_source, "sources": system.sources},
            "config": config.model_dump(), "rows": rows,
            "method": "a bound: bytes / bandwidth and FLOPs / peak per resource, composed overlapped (max) or serial "
                      "(sum, for CPU-computed experts); experts touched per layer under uniform routing unless "
                      "--experts-per-layer gives a measured figure (docs/placement.md)"}
