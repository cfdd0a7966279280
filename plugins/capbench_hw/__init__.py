"""Built-in hardware probes: the host CPU and NVIDIA GPUs (through NVML when installed)."""

from __future__ import annotations

from capbench_core import hookimpl
from capbench_core.plugins import HardwareRegistry


@hookimpl
def register_hardware_probes(register: HardwareRegistry) -> None:
    from capbench_hw.cpu import probe_cpu
    from capbench_hw.nvidia import probe_nvidia

    register.add_probe("cpu", probe_cpu)
    register.add_probe("nvidia", probe_nvidia)
