"""Recompute a stored run's latencies under another tool's definitions.

Every run keeps its raw chunk timestamps and token counts, so its numbers can
be set beside a peer's published ones. The peers differ (see docs/metrics.md):

* vllm (benchmarks/benchmark_serving): TPOT = (E2E − TTFT) / (output − 1), first token
  excluded; ITL = every gap between chunks.
* sglang (bench_serving): as vllm, but when the server sent no usage block the
  output length is the *requested* max_tokens.
* guidellm: TPOT = E2E / output (first token included); ITL = (E2E − TTFT) / (output − 1).
* llmperf: inter-token latency = E2E / output (first token included), one per request.
* capbench: docs/metrics.md (TPOT as vllm; ITL per token-bearing chunk).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from capbench_core.analytics.metrics import percentile_fields, request_timings
from capbench_core.contract.records import RequestRecord, RunResult


@dataclass(frozen=True)
class Latencies:
    ttft_ms: float | None
    tpot_ms: float | None
    itl_ms: list[float]


def _capbench(r: RequestRecord) -> Latencies:
    t = request_timings(r)
    return Latencies(t.ttft_ms, t.tpot_ms, t.itl_ms)


def _vllm(r: RequestRecord) -> Latencies:
    t = request_timings(r)
    gaps = [(b - a) / 1e6 for a, b in zip(r.chunk_offsets_ns, r.chunk_offsets_ns[1:])]
    return Latencies(t.ttft_ms, t.tpot_ms, gaps)


def _sglang(r: RequestRecord) -> Latencies:
    t = request_timings(r)
    out = t.output_tokens if r.token_count_source == "engine" or r.max_tokens is None else r.max_tokens
    tpot = (t.e2e_ms - t.ttft_ms) / (out - 1) if t.e2e_ms is not None and t.ttft_ms is not None and out > 1 else None
    return Latencies(t.ttft_ms, tpot, _vllm(r).itl_ms)


def _guidellm(r: RequestRecord) -> Latencies:
    t = request_timings(r)
    tpot = t.e2e_ms / t.output_tokens if t.e2e_ms is not None and t.output_tokens else None
    return Latencies(t.ttft_ms, tpot, [t.tpot_ms] if t.tpot_ms is not None else [])


def _llmperf(r: RequestRecord) -> Latencies:
    t = request_timings(r)
    per_token = t.e2e_ms / t.output_tokens if t.e2e_ms is not None and t.output_tokens else None
    return Latencies(t.ttft_ms, per_token, [per_token] if per_token is not None else [])


CONVENTIONS: dict[str, Callable[[RequestRecord], Latencies]] = {
    "capbench": _capbench, "vllm": _vllm, "sglang": _sglang, "guidellm": _guidellm, "llmperf": _llmperf,
}


def recompute(result: RunResult, convention: str) -> dict[str, float | None]:
    """TTFT/TPOT/ITL statistics of the measured, successful requests under ``convention``."""
    fn = CONVENTIONS[convention]
    per = [fn(r) for r in _measured(result.requests)]
    out: dict[str, float | None] = {}
    out.update(percentile_fields("ttft_ms", [p.ttft_ms for p in per if p.ttft_ms is not None]))
    out.update(percentile_fields("tpot_ms", [p.tpot_ms for p in per if p.tpot_ms is not None]))
    out.update(percentile_fields("itl_ms", [g for p in per for g in p.itl_ms]))
    return out


def _measured(records: Sequence[RequestRecord]) -> list[RequestRecord]:
    return [r for r in records if not r.warmup and r.error_kind is None]
