"""The Pareto view of a comparison: output tokens/s per device (what the operator pays for) against tokens/s
per user (1000 / TPOT ms: what each user sees), one frontier per backend.

A point is on its backend's frontier when no other load level of that backend is at least as good on both
axes and better on one. TPOT is the client's median, except where the client saw the stream in bursts (its
TPOT under half the engine's own mean inter-token time, as llama-server's and vLLM's CPU streams arrive):
there the engine's mean is the time a user waits per token, and the point says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from capbench_core.analytics.grouping import run_load
from capbench_core.analytics.metrics import pareto_front
from capbench_core.contract.records import RunResult

#: the client's TPOT below this share of the engine's own: the stream reached the client in bursts
BURST_SHARE = 0.5


@dataclass(frozen=True)
class ParetoPoint:
    run: RunResult
    load: str
    per_user: float      # tokens/s per user: 1000 / TPOT ms
    per_device: float    # output tokens/s / devices used
    tpot_ms: float
    tpot_source: str     # "client p50" or "engine mean (bursty stream)"
    frontier: bool


def user_tpot(r: RunResult) -> tuple[float | None, str]:
    """The TPOT a user sees: the client's p50, or the engine's own mean where the client saw bursts."""
    client, engine = r.metrics.tpot_ms_p50, r.metrics.server_tpot_ms_mean
    if engine is not None and (client is None or client < BURST_SHARE * engine):
        return engine, "engine mean (bursty stream)"
    return client, "client p50"


def devices(r: RunResult) -> int:
    """Devices the row used: tp x pp x dp of its placement (1 for a CPU or single-device row)."""
    p = r.placement
    return max(1, (p.tp or 1) * (p.pp or 1) * (p.dp or 1)) if p is not None else 1


def points(runs: Sequence[RunResult]) -> list[ParetoPoint]:
    """Every complete row with a TPOT and a throughput, its frontier flag within its backend."""
    out: list[ParetoPoint] = []
    for backend in sorted({r.backend for r in runs}):
        rows = []
        for r in runs:
            tpot, source = user_tpot(r)
            if r.backend == backend and r.status == "complete" and tpot and r.metrics.output_tok_per_s:
                rows.append((r, tpot, source))
        # pareto_front takes (cost-like, benefit-like): minus per-user speed, per-device throughput
        flags = pareto_front([(-1000 / tpot, (r.metrics.output_tok_per_s or 0) / devices(r)) for r, tpot, _ in rows])
        out += [ParetoPoint(r, run_load(r), 1000 / tpot, (r.metrics.output_tok_per_s or 0) / devices(r), tpot, source,
                            flag) for (r, tpot, source), flag in zip(rows, flags)]
    return out
