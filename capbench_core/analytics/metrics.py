"""Every metric formula, in one module. docs/metrics.md is the written definition.

Times come from the client clock (``time.perf_counter_ns``); per request:
TTFT = first token-bearing chunk - sent; E2E = last chunk - sent;
TPOT = (E2E - TTFT) / (output_tokens - 1) for requests with >= 2 tokens;
ITL = gaps between successive token-bearing chunks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from capbench_core.analytics.model_spec import ModelSpec
from capbench_core.analytics.weights import DTYPE_BYTES, WeightBytes
from capbench_core.contract.backend import DecodeStep, ModelShape
from capbench_core.contract.records import DecodeSteps, Metrics, Placement, RequestRecord

NS_PER_MS = 1e6


@dataclass(frozen=True)
class Timings:
    ttft_ms: float | None
    e2e_ms: float | None
    tpot_ms: float | None
    itl_ms: list[float]
    output_tokens: int
    multi_token_chunks: int


def request_timings(rec: RequestRecord) -> Timings:
    """Per-request latencies from the raw chunk offsets.

    TTFT and ITL use token-bearing chunks; E2E ends at the last chunk received, which may carry no
    token: servers send the end of a generation (the EOS token their usage block counts) as an empty
    chunk, and TPOT divides by that count, so the step that made it must be inside E2E too.
    """
    offsets = [o for o, n in zip(rec.chunk_offsets_ns, rec.chunk_tokens) if n > 0]
    tokens = rec.output_tokens if rec.output_tokens is not None else sum(rec.chunk_tokens)
    multi = sum(1 for n in rec.chunk_tokens if n > 1)
    if not offsets:
        return Timings(None, None, None, [], tokens, multi)
    ttft, e2e = offsets[0] / NS_PER_MS, max(offsets[-1], rec.chunk_offsets_ns[-1]) / NS_PER_MS
    tpot = (e2e - ttft) / (tokens - 1) if tokens >= 2 else None
    itl = [(b - a) / NS_PER_MS for a, b in zip(offsets, offsets[1:])]
    return Timings(ttft, e2e, tpot, itl, tokens, multi)


def percentile_fields(prefix: str, values: Sequence[float]) -> dict[str, float | None]:
    """{prefix_mean, prefix_p50, prefix_p90, prefix_p99}; None when there are no values.

    Percentiles use numpy's default (linear interpolation between order statistics).
    """
    keys = (f"{prefix}_mean", f"{prefix}_p50", f"{prefix}_p90", f"{prefix}_p99")
    if not values:
        return dict.fromkeys(keys)
    arr = np.asarray(values, dtype=np.float64)
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return dict(zip(keys, (float(arr.mean()), float(p50), float(p90), float(p99))))


def wilson_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % Wilson score interval for a proportion (well-behaved near 0 and 1)."""
    if n == 0:
        return (math.nan, math.nan)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def uniform_expected_experts(num_experts: int, top_k: int, batch: int) -> float:
    """Expected distinct experts per layer for ``batch`` tokens under uniform routing:
    E * (1 - (1 - k/E)^B)."""
    return num_experts * (1 - (1 - top_k / num_experts) ** batch)


def expected_experts(spec: ModelShape, batch: int, shares: Sequence[Sequence[float]] | None = None) -> list[float]:
    """Expected distinct experts per MoE layer for ``batch`` tokens: from measured per-expert shares where
    given (``analytics.routing.expected_distinct``), else uniform routing."""
    if not spec.is_moe:
        return []
    if shares:
        from capbench_core.analytics.routing import expected_distinct

        return expected_distinct(shares, batch)
    return [uniform_expected_experts(spec.num_experts, spec.top_k, batch)] * spec.moe_layers


def client_side_steps(records: Sequence[RequestRecord], spec: ModelSpec, serial: bool,
                      window_ns: int, shares: Sequence[Sequence[float]] | None = None) -> list[DecodeStep]:
    """Decode steps estimated from the client's view, for engines that report none.

    Serial engines (one request at a time): one batch-1 step per output token, each
    window / output tokens long — an upper bound on the step time (it includes
    prefill), so S-MBU and S-MFU are lower bounds; A = top_k exactly.
    Batching engines: every inter-token gap of a request is one step whose batch B
    is the number of requests decoding at the gap's midpoint, context B x this
    request's context, and A the uniform-routing expectation E(1 - (1 - k/E)^B);
    a step seen by B requests is counted B times in bytes and time alike.
    """
    ok = [r for r in records if not r.warmup and r.error_kind is None]
    if serial:
        tokens = sum(r.output_tokens or 0 for r in ok)
        if not tokens or window_ns <= 0:
            return []
        step_ns = window_ns // tokens
        ctx = sum((r.prompt_tokens or 0) + (r.output_tokens or 0) // 2 for r in ok) // max(len(ok), 1)
        a = float(spec.top_k) if spec.is_moe else 0.0
        return [DecodeStep(1, step_ns, ctx, [a] * spec.moe_layers) for _ in range(tokens)]
    spans, gaps = [], []
    for r in ok:
        offsets = _step_offsets(r)
        if len(offsets) >= 2:
            spans.append((offsets[0], offsets[-1]))
            gaps += [(a, b, (r.prompt_tokens or 0) + i + 1) for i, (a, b) in enumerate(zip(offsets, offsets[1:]))]
    steps = []
    for start, end, ctx in gaps:
        mid = (start + end) // 2
        batch = max(1, sum(1 for a, b in spans if a <= mid <= b))
        steps.append(DecodeStep(batch_size=batch, step_ns=end - start, context_tokens=batch * ctx,
                                distinct_experts=expected_experts(spec, batch, shares), started_ns=start))
    return steps


def _step_offsets(r: RequestRecord) -> list[int]:
    """Absolute times of a request's token-bearing chunks, and of a token-free end-of-generation chunk
    after them (a server's EOS chunk: its usage counts that token, so its gap is a decode step too)."""
    offsets = [r.sent_ns + o for o, n in zip(r.chunk_offsets_ns, r.chunk_tokens) if n > 0]
    if offsets and r.chunk_tokens[-1] == 0 and r.sent_ns + r.chunk_offsets_ns[-1] > offsets[-1] \
            and (r.output_tokens or 0) > sum(r.chunk_tokens):
        offsets.append(r.sent_ns + r.chunk_offsets_ns[-1])
    return offsets


def server_side_steps(records: Sequence[RequestRecord], spec: ModelShape, generated: float, step_ms: float,
                      batch: float, shares: Sequence[Sequence[float]] | None = None) -> list[DecodeStep]:
    """Decode steps from an engine's own counters, for engines whose stream reaches the client in bursts
    (llama-server): ``generated`` tokens in steps of ``batch`` sequences (its busy slots per decode call),
    each ``step_ms`` long (its generation seconds per generated token), A the uniform-routing expectation."""
    ok = [r for r in records if not r.warmup and r.error_kind is None]
    if generated <= 0 or step_ms <= 0 or batch <= 0 or not ok:
        return []
    b = max(1, round(batch))
    ctx = sum((r.prompt_tokens or 0) + (r.output_tokens or 0) / 2 for r in ok) / len(ok)
    a = expected_experts(spec, b, shares)
    return [DecodeStep(b, round(step_ms * 1e6), round(b * ctx), list(a))
            for _ in range(max(1, round(generated / batch)))]


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For (cost-like, benefit-like) pairs — latency and throughput, predicted loss and tok/s: True where
    no other point is at least as good in both and strictly better in one."""
    return [not any(j != i and a2 <= a and b2 >= b and (a2 < a or b2 > b) for j, (a2, b2) in enumerate(points))
            for i, (a, b) in enumerate(points)]


def latency_and_throughput(records: Sequence[RequestRecord], window_ns: int | None) -> Metrics:
    """Latency percentiles, token counts and throughputs over the measured requests."""
    measured = [r for r in records if not r.warmup]
    ok = [r for r in measured if r.error_kind is None]
    timings = [request_timings(r) for r in ok]
    errors: dict[str, int] = {}
    for r in measured:
        if r.error_kind is not None:
            errors[r.error_kind] = errors.get(r.error_kind, 0) + 1
    fields: dict[str, object] = {}
    fields.update(percentile_fields("ttft_ms", [t.ttft_ms for t in timings if t.ttft_ms is not None]))
    fields.update(percentile_fields("tpot_ms", [t.tpot_ms for t in timings if t.tpot_ms is not None]))
    fields.update(percentile_fields("itl_ms", [g for t in timings for g in t.itl_ms]))
    fields.update(percentile_fields("e2e_ms", [t.e2e_ms for t in timings if t.e2e_ms is not None]))
    input_total = sum(r.prompt_tokens or 0 for r in ok)
    output_total = sum(t.output_tokens for t in timings)
    m = Metrics(num_requests=len(measured), num_completed=len(ok), num_failed=len(measured) - len(ok),
                error_kinds=errors, multi_token_chunks=sum(t.multi_token_chunks for t in timings),
                input_tokens_total=input_total, output_tokens_total=output_total, **fields)  # type: ignore[arg-type]
    if window_ns and window_ns > 0:
        seconds = window_ns / 1e9
        m.duration_s = seconds
        m.request_throughput_rps = len(ok) / seconds
        m.input_tok_per_s = input_total / seconds
        m.output_tok_per_s = output_total / seconds
        m.total_tok_per_s = (input_total + output_total) / seconds
    return m


def accuracy(m: Metrics, records: Sequence[RequestRecord], metric: str | None) -> None:
    """Share of measured requests judged correct; failed requests count as wrong."""
    judged = [r for r in records if not r.warmup and (r.correct is not None or r.error_kind is not None)]
    if metric is None or not judged:
        m.notes["accuracy"] = "the task has no scorer" if metric is None else "no request was scored"
        return
    correct = sum(1 for r in judged if r.correct)
    low, high = wilson_interval(correct, len(judged))
    m.accuracy, m.accuracy_metric, m.accuracy_n = correct / len(judged), metric, len(judged)
    m.accuracy_ci95_low, m.accuracy_ci95_high = low, high
    names = {name for r in judged for name in r.scores}
    m.accuracy_by_metric = {name: sum(1 for r in judged if r.scores.get(name)) / len(judged) for name in sorted(names)}


@dataclass(frozen=True)
class ExternalScore:
    """Accuracy measured by an outside harness (lm-eval) on the same deployment, or why it is missing."""

    source: str
    scores: dict[str, float]
    n: int
    error: str = ""


def external_accuracy(m: Metrics, ext: ExternalScore) -> None:
    """The harness's first metric becomes `accuracy` (all of them in accuracy_by_metric); the Wilson
    interval treats it as a share of n per-sample 0/1 verdicts, which holds for exact match and acc."""
    if ext.error or not ext.scores:
        m.notes["accuracy"] = ext.error or f"{ext.source} reported no metric"
        return
    metric, value = next(iter(ext.scores.items()))
    m.accuracy, m.accuracy_metric, m.accuracy_by_metric = value, metric, dict(ext.scores)
    m.accuracy_n = ext.n or None
    if ext.n and 0.0 <= value <= 1.0:
        m.accuracy_ci95_low, m.accuracy_ci95_high = wilson_interval(round(value * ext.n), ext.n)
    m.notes["accuracy"] = f"scored by {ext.source} against the measured server"


@dataclass(frozen=True)
class StepCost:
    bytes: float
    flops: float


def decode_step_cost(spec: ModelSpec, step: DecodeStep, dtype: str, kv_dtype: str,
                     weight_bytes: WeightBytes | None = None) -> StepCost:
    """Bytes read and FLOPs of one decode step with B live sequences and measured A_l.

    bytes = dense weights (all but routed experts and the input table) + sum_l A_l x expert weights
            + B embedding rows, each class in its bytes per weight as served (``weight_bytes``; default: every
            weight in ``dtype``) + KV bytes each live sequence's attention reads, in ``kv_dtype``.
    FLOPs = B x (matmul FLOPs per token: 2 x dense weights but norms + 2 x top_k x expert params per MoE
            layer) + attention (q.k and p.v) against the cached tokens each sequence attends to.
    Sliding-window layers read and attend to at most their window: the step's summed context is taken
    as B sequences of its mean length (exact when they are equal; an upper bound otherwise).
    """
    wb = weight_bytes or WeightBytes.of_dtype(dtype)
    dense = spec.dense_read_params()
    experts_read = sum(step.distinct_experts) * spec.expert_params if spec.is_moe else 0
    embed_rows = step.batch_size * spec.hidden_size if spec.lm_head_params else 0
    batch = max(step.batch_size, 1)
    attended = batch * spec.attended_tokens(step.context_tokens / batch)  # summed over layers
    kv = attended * spec.kv_elements_per_token * DTYPE_BYTES[kv_dtype]
    bytes_read = dense * wb.dense + experts_read * wb.expert + embed_rows * wb.embedding + kv
    attention = 2 * (spec.attn_score_dim + spec.attn_value_dim) * attended
    return StepCost(bytes_read, step.batch_size * spec.matmul_flops_per_token() + attention)


def steps_record(steps: Sequence[DecodeStep], source: str, method: str, dtype: str, kv_dtype: str | None = None,
                 weight_bytes: WeightBytes | None = None) -> DecodeSteps | None:
    """The decode steps as stored with the result (None when there were none), with the bytes they count in."""
    if not steps:
        return None
    return DecodeSteps(source="measured" if source == "measured" else "estimated", method=method, dtype=dtype,
                       kv_dtype=kv_dtype, weight_bytes=weight_bytes.record() if weight_bytes else None,
                       batch_size=[s.batch_size for s in steps], step_ns=[s.step_ns for s in steps],
                       context_tokens=[s.context_tokens for s in steps],
                       distinct_experts=[list(s.distinct_experts) for s in steps])


def stored_steps(record: DecodeSteps) -> list[DecodeStep]:
    """Decode steps back from their stored form."""
    return [DecodeStep(batch_size=b, step_ns=t, context_tokens=c, distinct_experts=list(a))
            for b, t, c, a in zip(record.batch_size, record.step_ns, record.context_tokens, record.distinct_experts)]


def sparse_efficiency(m: Metrics, spec: ModelSpec, steps: Sequence[DecodeStep], source: str, method: str,
                      dtype: str, peak_bw_gbps: float | None, peak_tflops: float | None,
                      kv_dtype: str | None = None, weight_bytes: WeightBytes | None = None) -> None:
    """S-MBU and S-MFU over the decode steps of the measured window (sums of bytes and FLOPs over
    the sum of step times, so long steps weigh what they cost)."""
    if not steps:
        m.notes["s_mbu"] = m.notes["s_mfu"] = "no decode step was recorded by the engine"
        return
    costs = [decode_step_cost(spec, s, dtype, kv_dtype or dtype, weight_bytes) for s in steps]
    seconds = sum(s.step_ns for s in steps) / 1e9
    total_bytes, total_flops = sum(c.bytes for c in costs), sum(c.flops for c in costs)
    moe_steps = [s for s in steps if s.distinct_experts]
    m.decode_steps = len(steps)
    m.decode_batch_mean = float(np.mean([s.batch_size for s in steps]))
    m.decode_step_ms_mean = seconds * 1e3 / len(steps)
    m.bytes_per_decode_step_mean = total_bytes / len(steps)
    m.flops_per_decode_step_mean = total_flops / len(steps)
    if moe_steps:
        m.experts_activated_per_layer_mean = float(np.mean([np.mean(s.distinct_experts) for s in moe_steps]))
        m.expert_activation_source = "measured" if source == "measured" else "estimated"
        m.expert_activation_method = method
    m.peak_mem_bw_gbps, m.peak_flops_tflops = peak_bw_gbps, peak_tflops
    if seconds <= 0:
        m.notes["s_mbu"] = m.notes["s_mfu"] = "decode steps took no measurable time"
        return
    if peak_bw_gbps:
        m.s_mbu = _physical(m, "s_mbu", total_bytes / seconds / (peak_bw_gbps * 1e9))
    else:
        m.notes["s_mbu"] = "peak memory bandwidth of this hardware is unknown"
    if peak_tflops:
        m.s_mfu = _physical(m, "s_mfu", total_flops / seconds / (peak_tflops * 1e12))
    else:
        m.notes["s_mfu"] = f"peak dense {dtype} FLOPs of this hardware are unknown"


def tiered_mbu(m: Metrics, spec: ModelSpec, steps: Sequence[DecodeStep], dtype: str, placement: Placement | None,
               tier_gbps: Mapping[str, float | None], kv_dtype: str | None = None,
               weight_bytes: WeightBytes | None = None) -> None:
    """Tiered S-MBU for a row whose routed experts sit off the accelerator (docs/metrics.md): the bytes each
    tier served (experts on the host: host DRAM when the CPU computes them, PCIe when they are fetched) over the
    window's step time and that tier's bandwidth; ``s_mbu`` becomes the bottleneck tier's, ``s_mbu_single``
    keeps every byte over one bandwidth. A row whose weights sit in one memory is left as it is."""
    if placement is None or not placement.experts_off_device() or not steps or not spec.is_moe:
        return
    use = placement.weights["routed_experts"]
    if use.tier == "split" and not placement.host_expert_layers:
        m.notes["s_mbu_tiers"] = "the share of experts in host memory is not known per layer: S-MBU stays single"
        return
    share = placement.host_expert_layers / spec.moe_layers if use.tier == "split" and placement.host_expert_layers \
        else 1.0
    link = "host_dram" if use.execution == "host_compute" else "pcie"
    device_bw, host_bw = tier_gbps.get("device_mem"), tier_gbps.get(link)
    seconds = sum(s.step_ns for s in steps) / 1e9
    if not device_bw or not host_bw or seconds <= 0:
        m.notes["s_mbu_tiers"] = f"the {'device memory' if not device_bw else link} bandwidth is unknown"
        return
    wb = weight_bytes or WeightBytes.of_dtype(dtype)
    total = sum(decode_step_cost(spec, s, dtype, kv_dtype or dtype, wb).bytes for s in steps)
    host = sum(sum(s.distinct_experts) for s in steps) * spec.expert_params * wb.expert * min(share, 1.0)
    m.s_mbu_single = m.s_mbu
    m.s_mbu_tiers = {"device_mem": (total - host) / seconds / (device_bw * 1e9), link: host / seconds / (host_bw * 1e9)}
    bottleneck = max(m.s_mbu_tiers, key=lambda k: m.s_mbu_tiers[k])
    m.s_mbu = _physical(m, "s_mbu", m.s_mbu_tiers[bottleneck])
    m.notes["s_mbu"] = f"tiered: the bottleneck tier is {bottleneck} (s_mbu_tiers); every byte over the device's " \
                       f"bandwidth alone: s_mbu_single"


def _physical(m: Metrics, key: str, value: float) -> float | None:
    """A utilisation above 100 % means the step times were not physical (e.g. tokens
    reached the client in bursts): null with the reason rather than a wrong number."""
    if value <= 1.0:
        return value
    m.notes[key] = (f"computed {value:.2f} (> 100 %): the step times seen were shorter than the hardware "
                    f"allows, so this figure cannot be trusted")
    return None


def energy(m: Metrics, joules: float | None, source: str | None, missing_reason: str) -> None:
    """J per output token over the measured window, from an energy counter."""
    if joules is None:
        m.notes["energy_j"] = missing_reason
        return
    m.energy_j, m.energy_source = joules, source
    if m.output_tokens_total:
        m.energy_j_per_output_token = joules / m.output_tokens_total


def _within_slo(t: Timings, slo: dict[str, float]) -> bool:
    values = {"ttft_ms": t.ttft_ms, "tpot_ms": t.tpot_ms, "e2e_ms": t.e2e_ms}
    for key, budget in slo.items():
        value = values[key]
        if value is None and key == "tpot_ms":
            continue
        if value is None or value > budget:
            return False
    return True


# MLPerf Inference server-scenario latency budgets (ms), by preset name.
SLO_PRESETS: dict[str, dict[str, float]] = {
    "mlperf-mixtral-8x7b": {"ttft_ms": 2000.0, "tpot_ms": 200.0},
    "mlperf-llama2-70b": {"ttft_ms": 2000.0, "tpot_ms": 200.0},
    "mlperf-deepseek-r1": {"ttft_ms": 2000.0, "tpot_ms": 80.0},
}


def goodput(m: Metrics, records: Sequence[RequestRecord], slo: dict[str, float], window_ns: int) -> None:
    """Requests per second that completed within every SLO (`ttft_ms`, `tpot_ms`, `e2e_ms`);
    `slo_attainment` is their share of measured requests. A request without a TPOT (one
    token) passes the TPOT budget."""
    if not slo:
        m.notes["goodput_rps"] = "no SLO given (--slo ttft_ms=...,tpot_ms=... or a preset)"
        return
    measured = [r for r in records if not r.warmup]
    good = 0
    for r in measured:
        if r.error_kind is not None:
            continue
        if _within_slo(request_timings(r), slo):
            good += 1
    m.slo_attainment = good / len(measured) if measured else None
    if window_ns > 0:
        m.goodput_rps = good / (window_ns / 1e9)


def workload_figures(m: Metrics, records: Sequence[RequestRecord]) -> None:
    """What the workload's shape adds: how far an open-loop client fell behind its schedule and the TTFT
    counted from the scheduled time (so queueing in the client cannot hide), TTFT of first vs later turns of
    conversations, and the prefix cache: the workload's ceiling and the hit rate the responses report."""
    ok = [r for r in records if not r.warmup and r.error_kind is None]
    scheduled = [r for r in ok if r.scheduled_ns is not None]
    if scheduled:
        lag = [(r.sent_ns - (r.scheduled_ns or 0)) / NS_PER_MS for r in scheduled]
        m.schedule_lag_ms_p50, m.schedule_lag_ms_p99 = (float(v) for v in np.percentile(lag, [50, 99]))
        m.schedule_lag_ms_max = max(lag)
        late = [(r.sent_ns - (r.scheduled_ns or 0)) / NS_PER_MS + t.ttft_ms
                for r, t in ((r, request_timings(r)) for r in scheduled) if t.ttft_ms is not None]
        if late:
            m.ttft_from_scheduled_ms_p50, m.ttft_from_scheduled_ms_p99 = (float(v) for v in np.percentile(late,
                                                                                                          [50, 99]))
    turns = [(r.turn, request_timings(r).ttft_ms) for r in ok if r.turn is not None]
    first = [t for n, t in turns if n == 1 and t is not None]
    later = [t for n, t in turns if n and n > 1 and t is not None]
    m.ttft_ms_p50_first_turn = float(np.median(first)) if first else None
    m.ttft_ms_p50_later_turns = float(np.median(later)) if later else None
    prompt = sum(r.prompt_tokens or 0 for r in ok)
    if ok and prompt and all(r.shared_prefix_tokens is not None for r in ok):
        m.prefix_cache_ceiling = min(1.0, sum(r.shared_prefix_tokens or 0 for r in ok) / prompt)
    else:
        m.notes["prefix_cache_ceiling"] = "the task does not say which prompt tokens its requests share"
    if ok and prompt and all(r.cached_tokens is not None for r in ok):
        m.prefix_cache_hit_rate = sum(r.cached_tokens or 0 for r in ok) / prompt
    else:
        m.notes["prefix_cache_hit_rate"] = "the responses do not report cached prompt tokens"
