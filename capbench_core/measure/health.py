"""Is the client keeping up? An event-loop lag probe and the loop thread's CPU, per client process.

A load generator that cannot keep up measures itself: chunks wait in its socket buffers while its event loop is
busy, and the time stamped on them (when the loop gets to them) is late. Every client process runs a ``LagProbe``
beside its requests over the measured window: a task that sleeps ``PROBE_INTERVAL_S`` and records how late it
woke (the time any chunk may have waited for the loop), and the CPU time of the loop's thread. A row is
``client_limited`` when, in its busiest client process, the lag p99 reached ``LAG_P99_MS`` or the loop's thread
used ``CPU_SHARE`` of a core (docs/metrics.md, "Client health").
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType

import numpy as np

from capbench_core.contract.records import Metrics

PROBE_INTERVAL_S = 0.01
#: a chunk that may wait this long for the loop has a timestamp this late: the row measures the client
LAG_P99_MS = 10.0
#: a loop thread this busy has no slack left: chunks queue behind chunks even when the lag probe wakes on time
CPU_SHARE = 0.90


@dataclass
class Health:
    """One client process over the measured window: how late its loop woke, and its loop thread's CPU."""

    lag_ms: list[float] = field(default_factory=list)
    cpu_s: float = 0.0
    wall_s: float = 0.0

    @property
    def cpu_share(self) -> float:
        """CPU seconds of the loop's thread per second of the window (1.0: one core, always busy)."""
        return self.cpu_s / self.wall_s if self.wall_s > 0 else 0.0


class LagProbe:
    """``async with LagProbe() as probe:`` around a phase; ``probe.health`` afterwards. Enter it on the loop's
    own thread (its CPU is that thread's)."""

    def __init__(self, interval_s: float = PROBE_INTERVAL_S):
        self.interval_s = interval_s
        self.health = Health()
        self._task: asyncio.Task[None] | None = None
        self._cpu0 = self._wall0 = 0.0

    async def __aenter__(self) -> LagProbe:
        self._cpu0, self._wall0 = time.thread_time(), time.perf_counter()
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.health.cpu_s = time.thread_time() - self._cpu0
        self.health.wall_s = time.perf_counter() - self._wall0
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        lag = self.health.lag_ms
        while True:
            due = time.perf_counter() + self.interval_s
            await asyncio.sleep(self.interval_s)
            lag.append(max(0.0, (time.perf_counter() - due) * 1e3))


def limited(lag_ms_p99: float | None, cpu_share: float | None) -> bool:
    """The verdict from the busiest process's figures (the thresholds above)."""
    return (lag_ms_p99 or 0.0) >= LAG_P99_MS or (cpu_share or 0.0) >= CPU_SHARE


def client_figures(m: Metrics, healths: Sequence[Health], procs: int, in_process: bool) -> None:
    """The client's health on a row: lag and CPU of its busiest process, and the verdict (None, with a note, when
    the engine runs in capbench's own process: its compute then shares the loop's process and cannot be told
    from the client's)."""
    m.client_procs = procs
    lags = [h for h in healths if h.lag_ms]
    if not lags:
        m.notes["client_limited"] = "the window was too short for the client's event-loop probe"
        return
    m.client_lag_ms_p50 = float(np.percentile([x for h in lags for x in h.lag_ms], 50))
    m.client_lag_ms_p99 = max(float(np.percentile(h.lag_ms, 99)) for h in lags)
    m.client_cpu_share = max(h.cpu_share for h in healths)
    if in_process:
        m.notes["client_limited"] = ("the engine runs in capbench's own process: its work and the client's share "
                                     "it, so the client's health is not judged")
        return
    m.client_limited = limited(m.client_lag_ms_p99, m.client_cpu_share)
    if m.client_limited and m.client_cpu_share >= CPU_SHARE:
        m.notes["client_limited"] = (
            f"the client could not keep up (its loop thread at {m.client_cpu_share:.0%} of a core, loop lag p99 "
            f"{m.client_lag_ms_p99:.1f} ms, {procs} client process(es)): its timings include its own delay. Run "
            f"with more --client-procs if cores are free, or the client on another machine (--endpoint)")
    elif m.client_limited:
        m.notes["client_limited"] = (
            f"the client could not keep up: its event loop woke up to {m.client_lag_ms_p99:.1f} ms late (p99) while "
            f"using only {m.client_cpu_share:.0%} of a core, so it was waiting for one (the cores were busy with "
            f"other work, such as an engine on the same machine); its timings include that delay. Leave the client "
            f"a free core, or run it on another machine (--endpoint)")
