"""Built-in hardware probes: the host CPU and NVIDIA GPUs (the core's NVML probe)."""

from __future__ import annotations

from capbench_core import hookimpl
from capbench_core.contract.registry import HardwareRegistry


@hookimpl
def register_hardware_probes(register: HardwareRegistry) -> None:
    from capbench_core.measure.nvml import probe_nvidia
    from capbench_hw.cpu import probe_cpu

    register.add_probe("cpu", probe_cpu)
    register.add_probe("nvidia", probe_nvidia)
