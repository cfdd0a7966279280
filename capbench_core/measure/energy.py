"""Energy counters read around the measured window: RAPL on Linux CPUs, NVML on NVIDIA GPUs.

A counter that is absent or unreadable gives ``None`` with the reason.
"""

from __future__ import annotations

from pathlib import Path

POWERCAP = Path("/sys/class/powercap")


class NvmlMeter:
    """Sum of every visible NVIDIA GPU's total-energy counter (mJ since driver load)."""

    source = "NVML total energy counters"

    def __init__(self) -> None:
        self.reason = ""
        self._start: list[int] | None = None

    def _read(self) -> list[int] | None:
        try:
            import pynvml
        except ImportError:
            self.reason = "nvidia-ml-py is not installed (pip install 'capbench[nvidia]'), so NVML energy is unread"
            return None
        try:
            pynvml.nvmlInit()
            try:
                return [int(pynvml.nvmlDeviceGetTotalEnergyConsumption(pynvml.nvmlDeviceGetHandleByIndex(i)))
                        for i in range(pynvml.nvmlDeviceGetCount())]
            finally:
                pynvml.nvmlShutdown()
        except Exception as exc:  # NVML errors: driver missing, counter unsupported (pre-Volta)
            self.reason = f"NVML energy counter unreadable ({type(exc).__name__}: {exc})"
            return None

    def start(self) -> None:
        self._start = self._read()

    def stop(self) -> float | None:
        end = self._read()
        if end is None or self._start is None or len(end) != len(self._start):
            self.reason = self.reason or "NVML energy counter was not readable at the start of the window"
            return None
        return sum(b - a for a, b in zip(self._start, end)) / 1e3


class RaplMeter:
    """Sums package-level RAPL domains (``intel-rapl:N``; AMD exposes the same names)."""

    source = "RAPL package counters"

    def __init__(self, root: Path = POWERCAP):
        self.root = root
        self.domains = sorted(p for p in root.glob("intel-rapl:*") if p.name.count(":") == 1) \
            if root.is_dir() else []
        self._start: dict[Path, int] = {}
        self.reason = ""

    def _read(self) -> dict[Path, int] | None:
        if not self.domains:
            self.reason = f"no RAPL energy counter on this machine ({self.root} has no intel-rapl domain)"
            return None
        values = {}
        for d in self.domains:
            try:
                values[d] = int((d / "energy_uj").read_text())
            except (OSError, ValueError) as exc:
                self.reason = f"RAPL counter {d / 'energy_uj'} is not readable ({exc.__class__.__name__})"
                return None
        return values

    def start(self) -> None:
        self._start = self._read() or {}

    def stop(self) -> float | None:
        """Joules since start(), wrap-around corrected; None with ``reason`` set when unreadable."""
        end = self._read()
        if end is None or not self._start:
            self.reason = self.reason or "RAPL counter was not readable at the start of the window"
            return None
        total = 0
        for d, v in end.items():
            delta = v - self._start[d]
            if delta < 0:
                max_range = int((d / "max_energy_range_uj").read_text())
                delta += max_range
            total += delta
        return total / 1e6
