"""SLO search: the highest load a backend serves within a latency budget.

Probes double the load from a start until one misses the SLO (or halve it until one meets it), then bisect
between the highest load that met it and the lowest that missed, until the bracket is one request (max-
concurrency) or ``precision`` of the load (max-rate) wide, or the probe budget is spent. A probe meets the
SLO when every request completed and the chosen percentile of TTFT, TPOT and E2E is within its budget.
"""

from __future__ import annotations

from collections.abc import Generator, Mapping
from dataclasses import dataclass

from capbench_core.contract.records import Metrics, RunResult


@dataclass(frozen=True)
class Verdict:
    met: bool
    why: str


def meets(result: RunResult, slo: Mapping[str, float], percentile: str) -> Verdict:
    """Whether one probe met the SLO at the percentile, and the figure that decided."""
    m: Metrics = result.metrics
    if result.status != "complete" or m.num_failed:
        return Verdict(False, f"{m.num_failed} of {m.num_requests} requests failed ({result.status})")
    said = []
    for budget, limit in slo.items():
        name = f"{budget.removesuffix('_ms')}_ms_p{percentile}"
        value = getattr(m, name, None)
        if value is None:
            return Verdict(False, f"{name} was not measured")
        if value > limit:
            return Verdict(False, f"{name} {value:.1f} > {limit:g}")
        said.append(f"{name} {value:.1f} <= {limit:g}")
    return Verdict(True, ", ".join(said))


def probes(start: float, integer: bool, precision: float, steps: int) -> Generator[float, bool, float | None]:
    """Loads to try; send whether each met the SLO. Returns the highest load that met it (None: none did)."""
    met_at: float | None = None
    missed_at: float | None = None
    load = max(1.0, round(start)) if integer else start
    for _ in range(steps):
        if (yield load):
            met_at = load
        else:
            missed_at = load
        if missed_at is None:
            load = load * 2
        elif met_at is None:
            if integer and load <= 1:
                break
            load = max(1.0, float(int(load // 2))) if integer else load / 2
        elif (missed_at - met_at <= 1) if integer else (missed_at - met_at <= precision * met_at):
            break
        else:
            load = float((int(met_at) + int(missed_at)) // 2) if integer else (met_at + missed_at) / 2
    return met_at
