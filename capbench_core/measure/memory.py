"""Memory an engine holds while it serves: the peak over the run of its processes' memory, sampled.

The engine's process tree (the launched server and every child it started: vLLM's and SGLang's workers,
schedulers, detokenizers) is walked at each sample; each process counts its proportional set size (PSS:
pages shared between the processes are split between them, so a forked worker is not counted twice), or
its resident set where PSS cannot be read. An in-process engine (torch_moe, llama-cpp-python) is measured
as capbench's own process, which holds it. On CUDA the GPU memory those processes hold is read from NVML.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

INTERVAL_S = 0.25


@dataclass(frozen=True)
class MemoryPeak:
    peak_bytes: int | None
    processes: int
    samples: int
    device_bytes: int | None
    method: str


class MemorySampler:
    """Samples a process tree's memory on a thread between :meth:`start` and :meth:`stop`."""

    def __init__(self, pid: int, label: str, interval_s: float = INTERVAL_S, gpu: bool = False):
        self.pid, self.label, self.interval_s, self.gpu = pid, label, interval_s, gpu
        self.peak, self.processes, self.samples = 0, 0, 0
        self.device_peak: int | None = None
        self.kind = "PSS"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="capbench-memory", daemon=True)

    def start(self) -> MemorySampler:
        self._sample()
        self._thread.start()
        return self

    def stop(self) -> MemoryPeak:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sample()
        if not self.samples:
            return MemoryPeak(None, 0, 0, None, f"{self.label}: its processes could not be read")
        method = (f"peak {self.kind} of {self.label} ({self.processes} process{'es' if self.processes > 1 else ''}), "
                  f"sampled every {self.interval_s:g} s over the run ({self.samples} samples)")
        return MemoryPeak(self.peak, self.processes, self.samples, self.device_peak, method)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        total = 0
        for proc in tree:
            try:
                total += self._bytes(proc)
            except psutil.Error:  # a process that ended between the walk and the read
                continue
        self.samples += 1
        self.processes = max(self.processes, len(tree))
        self.peak = max(self.peak, total)
        if self.gpu:
            from capbench_core.measure.nvml import gpu_memory_of

            used = gpu_memory_of([p.pid for p in tree])
            if used is not None:
                self.device_peak = max(self.device_peak or 0, used)

    def _bytes(self, proc: object) -> int:
        import psutil

        assert isinstance(proc, psutil.Process)
        try:
            return int(proc.memory_full_info().pss)
        except (psutil.AccessDenied, AttributeError):
            self.kind = "RSS"
            return int(proc.memory_info().rss)
