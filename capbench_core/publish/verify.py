"""Re-derive a submitted run from its own raw records, and refuse what no hardware can produce.

A result bundle's content hash proves nothing about honesty: anyone with capbench can recompute it.
But every run carries its raw facts — per-request send times, chunk offsets, tokens per chunk,
outputs and verdicts, the decode steps the efficiency metrics came from, the model's config, the
hardware spec and peaks. ``check(result)`` recomputes every aggregate that follows from them with the
same code that produced them (``capbench_core.analytics.metrics``), and returns one ``Finding`` per field that
differs beyond float rounding, or that is impossible.

What cannot be recomputed from the run (energy counters, the window's length as the client timed it)
is only bounded, and labelled "reported, not re-derived" where it is shown.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from capbench_core.analytics import figures, metrics
from capbench_core.analytics.figures import tier_bandwidths
from capbench_core.analytics.model_spec import ModelSpec, spec_from_config
from capbench_core.analytics.weights import DTYPE_BYTES, WeightBytes
from capbench_core.contract.records import Metrics, RunResult
from capbench_core.errors import CapbenchError

REL_TOL = 1e-9
ABS_TOL = 1e-9
# Aggregates recomputed from the requests; the rest of Metrics is checked by its own rule below or reported.
LATENCY_FIELDS = ("num_requests", "num_completed", "num_failed", "error_kinds", "multi_token_chunks",
                  "input_tokens_total", "output_tokens_total", "request_throughput_rps", "input_tok_per_s",
                  "output_tok_per_s", "total_tok_per_s", *(f"{k}_{s}" for k in ("ttft_ms", "tpot_ms", "itl_ms",
                                                                                 "e2e_ms")
                                                               for s in ("mean", "p50", "p90", "p99")))
EFFICIENCY_FIELDS = ("decode_steps", "decode_batch_mean", "decode_step_ms_mean", "bytes_per_decode_step_mean",
                     "flops_per_decode_step_mean", "experts_activated_per_layer_mean", "s_mbu", "s_mbu_tiers",
                     "s_mbu_single", "s_mfu")
REPORTED_ONLY = ("energy_j", "energy_j_per_output_token", "duration_s", "server_ttft_ms_mean",
                 "server_tpot_ms_mean", "server_e2e_ms_mean", "mem_peak_gb", "device_mem_peak_gb",
                 "kv_capacity_tokens", "kv_gb_predicted")


@dataclass(frozen=True)
class Finding:
    """One field of one run that does not hold: what the run states and what it should be."""

    field: str
    stated: Any
    expected: Any
    reason: str = ""

    def line(self, run_index: int) -> str:
        why = f" ({self.reason})" if self.reason else ""
        return f"runs.{run_index}.{self.field}: stated {_show(self.stated)}, recomputed {_show(self.expected)}{why}"


def _show(value: Any) -> str:
    return f"{value:.9g}" if isinstance(value, float) else repr(value)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=REL_TOL, abs_tol=ABS_TOL)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


def _compare(prefix: str, stated: Metrics, derived: Metrics, fields: tuple[str, ...]) -> Iterator[Finding]:
    for name in fields:
        a, b = getattr(stated, name), getattr(derived, name)
        if not _same(a, b):
            yield Finding(f"{prefix}.{name}", a, b)


def check(result: RunResult, tasks: Mapping[str, Any] | None = None) -> list[Finding]:
    """Every way ``result`` disagrees with its own records or with physics; [] for an honest run."""
    findings = list(_impossible(result))
    if findings:
        return findings  # figures that cannot be are reported first; recomputing them would only add noise
    findings += _latency(result)
    findings += _accuracy(result, tasks or {})
    findings += _model(result)
    findings += _efficiency(result)
    findings += _cost(result)
    findings += _routing(result)
    return findings


def _impossible(r: RunResult) -> Iterator[Finding]:
    m = r.metrics
    for name in ("s_mbu", "s_mfu", "accuracy", "slo_attainment"):
        value = getattr(m, name)
        if value is not None and value > 1.0:
            yield Finding(f"metrics.{name}", value, "<= 1", "a utilisation or a share above 100 % is impossible")
    if m.num_completed > m.num_requests:
        yield Finding("metrics.num_completed", m.num_completed, f"<= {m.num_requests}",
                      "more requests completed than were sent")
    measured = [q for q in r.requests if not q.warmup]
    if len(measured) != m.num_requests:
        yield Finding("metrics.num_requests", m.num_requests, len(measured), "the run's own request records")
    for i, q in enumerate(r.requests):
        offsets = q.chunk_offsets_ns
        if q.sent_ns < 0 or any(o < 0 for o in offsets):
            yield Finding(f"requests.{i}.chunk_offsets_ns", offsets[:3], ">= 0",
                          "a chunk arrived before its request was sent")
        elif any(b < a for a, b in zip(offsets, offsets[1:])):
            yield Finding(f"requests.{i}.chunk_offsets_ns", offsets[:5], "non-decreasing", "timestamps out of order")
        if len(q.chunk_tokens) != len(offsets) or any(n < 0 for n in q.chunk_tokens):
            yield Finding(f"requests.{i}.chunk_tokens", len(q.chunk_tokens), len(offsets),
                          "one token count per chunk, none negative")
    yield from _beyond_peaks(r)
    yield from _datasheet(r)


def _beyond_peaks(r: RunResult) -> Iterator[Finding]:
    """Every output token costs at least the matmul FLOPs of one forward pass: no run can produce them
    faster than the peak FLOP/s it declares allows."""
    m = r.metrics
    spec = _spec(r)
    if spec is None or not m.output_tok_per_s or not m.peak_flops_tflops:
        return
    ceiling = m.peak_flops_tflops * 1e12 / spec.matmul_flops_per_token()
    if m.output_tok_per_s > ceiling * (1 + 1e-6):
        yield Finding("metrics.output_tok_per_s", m.output_tok_per_s, f"<= {ceiling:.6g}",
                      f"{m.peak_flops_tflops:g} TFLOP/s cannot produce more tokens/s of a model whose forward "
                      f"pass is {spec.matmul_flops_per_token():.4g} matmul FLOPs")


def _datasheet(r: RunResult) -> Iterator[Finding]:
    """A datasheet device's peaks are the datasheet's: a spec that says otherwise was edited."""
    from capbench_core.analytics.datasheets import accelerator_peaks

    accel = [d for d in r.hardware.devices if d.kind != "cpu"]
    if not accel or r.hardware.peak_mem_bw_gbps.source != "datasheet":
        return
    bw, flops = accelerator_peaks(accel[0])
    if not _same(r.hardware.peak_mem_bw_gbps.value, bw.value):
        yield Finding("hardware.peak_mem_bw_gbps.value", r.hardware.peak_mem_bw_gbps.value, bw.value,
                      f"the datasheet row for {accel[0].model}")
    for dtype, peak in r.hardware.peak_flops_tflops.items():
        if peak.source == "datasheet" and dtype in flops and not _same(peak.value, flops[dtype].value):
            yield Finding(f"hardware.peak_flops_tflops.{dtype}.value", peak.value, flops[dtype].value,
                          f"the datasheet row for {accel[0].model}")


def _latency(r: RunResult) -> Iterator[Finding]:
    """Percentiles, means, counts and throughputs from the request records over the stated window."""
    window_ns = round(r.metrics.duration_s * 1e9) if r.metrics.duration_s else None
    derived = metrics.latency_and_throughput(r.requests, window_ns)
    yield from _compare("metrics", r.metrics, derived, LATENCY_FIELDS)
    measured = [q for q in r.requests if not q.warmup and q.error_kind is None]
    spans = [q.sent_ns + q.chunk_offsets_ns[-1] for q in measured if q.chunk_offsets_ns]
    starts = [q.sent_ns for q in measured]
    if window_ns and spans and max(spans) - min(starts) > window_ns * (1 + 1e-6):
        yield Finding("metrics.duration_s", r.metrics.duration_s, f">= {(max(spans) - min(starts)) / 1e9:.6g}",
                      "the window is shorter than the requests it measured")
    if r.workload.slo and window_ns:
        metrics.goodput(derived, r.requests, r.workload.slo, window_ns)
        yield from _compare("metrics", r.metrics, derived, ("goodput_rps", "slo_attainment"))


def _accuracy(r: RunResult, tasks: Mapping[str, Any]) -> Iterator[Finding]:
    """Every stored verdict re-scored from the stored output where the task is known here (its requests
    rebuilt and matched against the workload hash); the stored figure must follow from the verdicts."""
    m = r.metrics
    if m.notes.get("accuracy", "").startswith("scored by"):  # an outside harness (lm-eval): reported
        return
    workload = _workload(r, tasks)
    if workload is not None and workload.scoring is not None:
        for i, q in enumerate(r.requests):
            if q.error_kind is None and q.output_text is not None:
                expected = workload.score(q.id, q.output_text)
                if expected is not None and (q.scores != expected or q.correct != next(iter(expected.values()))):
                    yield Finding(f"requests.{i}.scores", q.scores, expected, "re-scored with the task's scorer")
    derived = Metrics()
    metrics.accuracy(derived, r.requests, m.accuracy_metric if m.accuracy is not None else None)
    yield from _compare("metrics", m, derived, ("accuracy", "accuracy_n", "accuracy_ci95_low", "accuracy_ci95_high",
                                                "accuracy_by_metric"))


def _workload(r: RunResult, tasks: Mapping[str, Any]) -> Any:
    """The run's workload rebuilt by its task, when the task is here and rebuilds the same requests."""
    from capbench_core.contract.backend import ModelRef

    task = tasks.get(r.workload.task)
    if task is None or task.scores_externally:
        return None
    n = r.workload.num_requests + r.workload.warmup_requests
    try:
        workload = _build(task, n, tuple(sorted((k, str(v)) for k, v in r.workload.params.items())),
                          ModelRef(r.model.name, Path(r.model.path)))
    except (CapbenchError, OSError, ValueError, TypeError):
        return None
    return workload if workload.hash() == r.workload.hash else None


@lru_cache(maxsize=32)
def _build(task: Any, n: int, params: tuple[tuple[str, str], ...], model: Any) -> Any:
    return task.build(model, n, dict(params))


def _spec(r: RunResult) -> ModelSpec | None:
    if r.model.config is None:
        return None
    try:
        return spec_from_config(r.model.config, r.model.name)
    except CapbenchError:
        return None


def _model(r: RunResult) -> Iterator[Finding]:
    """The model record against the counts capbench computes from the config it carries."""
    spec = _spec(r)
    if spec is None:
        return
    for name in ("total_params", "active_params", "active_params_no_embed", "num_experts", "top_k", "sparsity"):
        stated, derived = getattr(r.model, name), getattr(spec, name)
        if not _same(stated, derived):
            yield Finding(f"model.{name}", stated, derived, "counted from the model's own config")
    predicted = r.metrics.weights_gb_predicted
    if predicted is not None and r.model.dtype in DTYPE_BYTES:
        expected = spec.weight_bytes(r.model.dtype) / 1e9
        if not _same(predicted, expected):
            yield Finding("metrics.weights_gb_predicted", predicted, expected,
                          f"every weight of the model's config in {r.model.dtype}")


def _shares(hw: Any, accelerator: list[float | None], cpu: list[float | None]) -> set[float]:
    """The peaks a row may divide by: the CPU's, and the accelerators' for 1..n of the n visible devices (a run
    using tp=2 of 8 GPUs divides by two GPUs' peaks)."""
    counts = [d.count for d in hw.devices if d.kind != "cpu"]
    n = counts[0] if counts else 1
    out = {v for v in cpu if v}
    out |= {v * k / n for v in accelerator if v for k in range(1, n + 1)}
    return out


def _efficiency(r: RunResult) -> Iterator[Finding]:
    """S-MBU and S-MFU from the stored decode steps, the model's config and the peaks the run states,
    which must be this hardware's own."""
    m, steps = r.metrics, r.decode_steps
    spec = _spec(r)
    if steps is None or spec is None:
        return
    hw = r.hardware
    bw_peaks = _shares(hw, [p.value for p in (hw.peak_mem_bw_gbps,) if p is not None],
                       [p.value for p in (hw.cpu_peak_mem_bw_gbps,) if p is not None])
    if m.peak_mem_bw_gbps is not None and not any(_same(m.peak_mem_bw_gbps, v) for v in bw_peaks):
        yield Finding("metrics.peak_mem_bw_gbps", m.peak_mem_bw_gbps, sorted(bw_peaks),
                      "not a peak of the hardware the run declares (or of a part of its accelerators)")
    flops_peaks = _shares(hw, [p.value for p in hw.peak_flops_tflops.values()],
                          [p.value for p in hw.cpu_peak_flops_tflops.values()])
    if m.peak_flops_tflops is not None and not any(_same(m.peak_flops_tflops, v) for v in flops_peaks):
        yield Finding("metrics.peak_flops_tflops", m.peak_flops_tflops, sorted(flops_peaks),
                      "not a peak of the hardware the run declares (or of a part of its accelerators)")
    derived = Metrics()
    try:
        wb = WeightBytes.from_record(steps.weight_bytes, steps.dtype)
    except (CapbenchError, TypeError) as exc:
        yield Finding("decode_steps.weight_bytes", steps.weight_bytes, None, f"not bytes per weight: {exc}")
        return
    stored = metrics.stored_steps(steps)
    metrics.sparse_efficiency(derived, spec, stored, steps.source, steps.method, steps.dtype,
                              m.peak_mem_bw_gbps, m.peak_flops_tflops, steps.kv_dtype, wb)
    if derived.s_mbu is not None:
        metrics.tiered_mbu(derived, spec, stored, steps.dtype, r.placement,
                           tier_bandwidths(hw, m.peak_mem_bw_gbps), steps.kv_dtype, wb)
    yield from _compare("metrics", m, derived, EFFICIENCY_FIELDS)


ROUTING_FIELDS = ("routing_imbalance_mean", "routing_imbalance_max", "routing_hot_share", "ep_tax")


def _routing(r: RunResult) -> Iterator[Finding]:
    """The routing figures from the row's per-expert loads, which must fit the model (one row of E experts per
    MoE layer) and physics (every layer routes the same tokens, top_k copies each)."""
    m = r.metrics
    if r.routing is None:
        for name in ROUTING_FIELDS:
            if getattr(m, name):
                yield Finding(f"metrics.{name}", getattr(m, name), None, "a routing figure without routing loads")
        return
    tokens = r.routing.tokens
    spec = _spec(r)
    if spec is not None and (len(tokens) != spec.moe_layers or any(len(t) != spec.num_experts for t in tokens)):
        yield Finding("routing.tokens", [len(tokens), len(tokens[0]) if tokens else 0],
                      [spec.moe_layers, spec.num_experts], "one row of num_experts loads per MoE layer")
        return
    totals = {sum(layer) for layer in tokens}
    if any(n < 0 for layer in tokens for n in layer) or len(totals) > 1 or (
            spec is not None and any(t % spec.top_k for t in totals)):
        yield Finding("routing.tokens", sorted(totals), "one total, a multiple of top_k, no negative load",
                      "every MoE layer routes the same decode tokens, top_k copies each")
        return
    derived = Metrics()
    figures.routing_metrics(derived, r.routing)
    yield from _compare("metrics", m, derived, ROUTING_FIELDS)


def _cost(r: RunResult) -> Iterator[Finding]:
    """$/Mtok from the stated hourly price and the (re-derived) output throughput."""
    m = r.metrics
    if m.price_usd_per_hour is None or not m.output_tok_per_s:
        if m.cost_usd_per_mtok is not None and m.price_usd_per_hour is None:
            yield Finding("metrics.cost_usd_per_mtok", m.cost_usd_per_mtok, None, "a cost without a stated price")
        return
    expected = m.price_usd_per_hour / (m.output_tok_per_s * 3600) * 1e6
    if not _same(m.cost_usd_per_mtok, expected):
        yield Finding("metrics.cost_usd_per_mtok", m.cost_usd_per_mtok, expected,
                      f"${m.price_usd_per_hour:g}/h at the stated output throughput")
