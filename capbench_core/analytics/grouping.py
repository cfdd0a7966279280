"""Which runs sit side by side, and how a load level is named (terminal, leaderboard, progress, sweeps)."""

from __future__ import annotations

from collections.abc import Sequence

from capbench_core.contract.records import RunResult

GroupKey = tuple[str, str, str, str]


def load_label(concurrency: int, rate_rps: float | None = None, arrival: str = "closed") -> str:
    """`c=8` for a closed-loop level, `2/s` for a Poisson rate, `trace` for a replayed trace: the one name of a
    load level."""
    if arrival == "trace":
        return "trace"
    return f"{rate_rps:g}/s" if rate_rps else f"c={concurrency}"


def run_load(r: RunResult) -> str:
    """The load label of a stored run."""
    return load_label(r.workload.concurrency, r.workload.rate_rps, r.workload.arrival)


def group_runs(results: Sequence[RunResult]) -> dict[GroupKey, list[RunResult]]:
    """Runs that may be compared side by side: same hardware fingerprint, model, task and workload."""
    groups: dict[GroupKey, list[RunResult]] = {}
    for r in results:
        key = (r.hardware.fingerprint, r.model.name, r.workload.task, r.workload.hash)
        groups.setdefault(key, []).append(r)
    return groups
