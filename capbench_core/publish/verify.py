"""Re-derive a submitted run from its own raw records, and refuse what no hardware can produce.

A result bundle's content hash proves nothing about honesty: anyone with capbench can recompute it.
But every run carries its raw facts — per-request send times, chunk offsets, tokens per chunk,
outputs and verdicts, the decode steps the efficiency metrics came from, the model's config, the
hardware spec and peaks. ``check(result)`` recomputes every aggregate that follows from them with the
same code that produced them (``capbench_core.analytics.metrics``), and returns one ``Finding`` per field that
differs beyond float rounding, or that is impossible.

It fails closed: a stated figure whose inputs are missing, null or unparseable (no decode steps, no model
config, no SLO, a task not installed here or a workload that does not rebuild) is recomputed as null, so the
figure is refused. What cannot be recomputed from any bundle (energy counters, the engine's own latencies,
memory peaks, a price) is bounded where physics allows and listed by ``unverified`` — stored with the run as
``metrics.unverified`` and shown as "reported, not verified". docs/leaderboard.md has the table of every field.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from capbench_core.analytics import figures, metrics
from capbench_core.analytics.model_spec import ModelSpec, spec_from_config
from capbench_core.analytics.weights import DTYPE_BYTES
from capbench_core.contract.records import Metrics, RunResult
from capbench_core.errors import CapbenchError
from capbench_core.measure.health import CPU_SHARE, LAG_P99_MS, limited
from capbench_core.publish import bounds
from capbench_core.publish.findings import Finding, compare, same, show

# Aggregates recomputed from the requests; the rest of Metrics is checked by its own rule below or reported.
LATENCY_FIELDS = ("num_requests", "num_completed", "num_failed", "error_kinds", "multi_token_chunks",
                  "input_tokens_total", "output_tokens_total", "request_throughput_rps", "input_tok_per_s",
                  "output_tok_per_s", "total_tok_per_s", *(f"{k}_{s}" for k in ("ttft_ms", "tpot_ms", "itl_ms",
                                                                                 "e2e_ms")
                                                               for s in ("mean", "p50", "p90", "p99")))
EFFICIENCY_FIELDS = ("decode_steps", "decode_batch_mean", "decode_step_ms_mean", "bytes_per_decode_step_mean",
                     "flops_per_decode_step_mean", "experts_activated_per_layer_mean", "s_mbu", "s_mbu_tiers",
                     "s_mbu_single", "s_mfu")
ACTIVATION_FIELDS = ("expert_activation_source", "expert_activation_method")
#: Figures no bundle can prove, stored as reported, not verified (``unverified``): metric -> where it comes from.
REPORTED_ONLY = {
    "energy_j": "the submitter's energy counter (RAPL or NVML)",
    "server_ttft_ms_mean": "the engine's own /metrics", "server_tpot_ms_mean": "the engine's own /metrics",
    "server_e2e_ms_mean": "the engine's own /metrics",
    "mem_peak_gb": "sampled on the submitter's machine (bounded by its declared memory)",
    "device_mem_peak_gb": "sampled on the submitter's machine (bounded by its declared memory)",
    "kv_capacity_tokens": "the engine's own report", "kv_gb_predicted": "a prediction at the run's context",
    "price_usd_per_hour": "the submitter's stated price (the costs are re-derived from it)",
    "prefix_cache_hit_rate_engine": "the engine's own /metrics",
    "prefix_cache_reset": "the submitter's engine answered the reset",
    "client_procs": "the submitter's client", "client_lag_ms_p50": "the submitter's client's own event-loop probe",
    "client_lag_ms_p99": "the submitter's client's own event-loop probe",
    "client_cpu_share": "the submitter's client's own CPU time",
}
#: A utilisation up to 1 + this is accepted (null with a note, as the runner stores it): what caches serve;
#: above it the run is refused.
CACHE_MARGIN = 0.10


_same, _show, _compare = same, show, compare


def check(result: RunResult, tasks: Mapping[str, Any] | None = None) -> list[Finding]:
    """Every way ``result`` disagrees with its own records or with physics; [] for an honest run. ``tasks``
    (name -> Task) are the tasks installed here: a run of any other task is refused (its workload cannot be
    rebuilt, so neither its request ids nor its verdicts can be checked)."""
    findings = [*_impossible(result), *bounds.consistency(result, _spec(result))]
    if findings:
        return findings  # figures that cannot be are reported first; recomputing them would only add noise
    findings += _latency(result)
    findings += _accuracy(result, tasks or {})
    findings += _model(result)
    findings += _efficiency(result)
    findings += _cost(result)
    findings += _energy(result)
    findings += _client(result)
    findings += _routing(result)
    findings += _workload_shape(result)
    return findings


def unverified(result: RunResult, tasks: Mapping[str, Any] | None = None) -> dict[str, str]:
    """What of a run that passed ``check`` is stored as reported, not verified: path in the result -> why.
    Whatever the bundle itself said is replaced by this."""
    m = result.metrics
    out = {f"metrics.{name}": why for name, why in REPORTED_ONLY.items() if getattr(m, name) is not None}
    if result.engine_metrics:
        out["engine_metrics"] = "the engine's own /metrics"
    task = _task(result.workload.task, tasks or {})
    if m.accuracy is not None and task is not None and task.scores_externally:
        out["metrics.accuracy"] = "scored by an outside harness against the submitter's server"
    out["hardware"] = "as stated by the submitter (a signature names who; nothing in a bundle proves it)"
    for name in Metrics.model_fields:  # a figure added to Metrics after this verifier: never trusted silently
        value = getattr(m, name)
        if name not in CHECKED_METRICS and name not in REPORTED_ONLY and value not in (None, {}, []):
            out[f"metrics.{name}"] = "not checked: a figure this capbench's verifier does not know"
    return out


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


def _declared_flops(r: RunResult) -> float | None:
    """The largest dense FLOP/s peak the hardware declares, of any dtype, accelerators or host CPU."""
    hw = r.hardware
    values = [p.value for p in (*hw.peak_flops_tflops.values(), *hw.cpu_peak_flops_tflops.values()) if p.value]
    return max(values) if values else None


def _beyond_peaks(r: RunResult) -> Iterator[Finding]:
    """Every output token costs at least the matmul FLOPs of one forward pass: no run can produce them
    faster than the largest peak FLOP/s its hardware declares allows. A throughput with no peak to bound it
    is refused (fail closed); prompt tokens are left out (a prefix cache serves them without compute)."""
    m = r.metrics
    spec = _spec(r)
    if spec is None or not m.output_tok_per_s:
        return
    peak = _declared_flops(r)
    if peak is None:
        yield Finding("metrics.output_tok_per_s", m.output_tok_per_s, None,
                      "the hardware declares no peak FLOP/s, so the throughput cannot be bounded")
        return
    ceiling = peak * 1e12 / spec.matmul_flops_per_token()
    if m.output_tok_per_s > ceiling * (1 + 1e-6):
        yield Finding("metrics.output_tok_per_s", m.output_tok_per_s, f"<= {ceiling:.6g}",
                      f"{peak:g} TFLOP/s cannot produce more tokens/s of a model whose forward "
                      f"pass is {spec.matmul_flops_per_token():.4g} matmul FLOPs")


def _datasheet(r: RunResult) -> Iterator[Finding]:
    """A datasheet device's peaks are the datasheet's, whatever source the spec names: capbench takes an
    accelerator's peaks from its datasheet row, so a spec that says otherwise was edited."""
    from capbench_core.analytics.datasheets import accelerator_peaks

    accel = [d for d in r.hardware.devices if d.kind != "cpu"]
    if not accel:
        return
    bw, flops = accelerator_peaks(accel[0])
    if bw.source != "datasheet":
        return
    stated = r.hardware.peak_mem_bw_gbps.value
    if stated is not None and not _same(stated, bw.value):
        yield Finding("hardware.peak_mem_bw_gbps.value", stated, bw.value, f"the datasheet row for {accel[0].model}")
    for dtype, peak in r.hardware.peak_flops_tflops.items():
        if peak.value is not None and not _same(peak.value, flops[dtype].value if dtype in flops else None):
            yield Finding(f"hardware.peak_flops_tflops.{dtype}.value", peak.value,
                          flops[dtype].value if dtype in flops else None, f"the datasheet row for {accel[0].model}")


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
    yield from _goodput(r, derived, window_ns)


SLO_KEYS = ("ttft_ms", "tpot_ms", "e2e_ms")


def _goodput(r: RunResult, derived: Metrics, window_ns: int | None) -> Iterator[Finding]:
    """Goodput and SLO attainment from the records and the run's SLO; without an SLO (or a window) they are
    null, so a stated figure is refused."""
    slo = r.workload.slo
    if any(key not in SLO_KEYS for key in slo):
        yield Finding("workload.slo", sorted(slo), list(SLO_KEYS), "an SLO budget capbench does not define")
        return
    if slo and window_ns:
        metrics.goodput(derived, r.requests, slo, window_ns)
    why = "" if slo and window_ns else "no SLO" if not slo else "no measured window"
    yield from _compare("metrics", r.metrics, derived, ("goodput_rps", "slo_attainment"),
                        f"{why} to re-derive it from" if why else "")


def _accuracy(r: RunResult, tasks: Mapping[str, Any]) -> Iterator[Finding]:
    """The workload rebuilt by its task (installed here) to the stated hash, the records' ids against it, and
    every stored verdict re-scored from the stored output; the figures must follow from the verdicts. A task
    that scores with an outside harness (lm-eval) gives a reported accuracy, bounded by its own n."""
    workload, why = _workload(r, tasks)
    if workload is None:
        yield Finding("workload.hash", r.workload.hash, None, why)
        return
    yield from _request_ids(r, workload)
    task = _task(r.workload.task, tasks)
    if task is not None and task.scores_externally:
        yield from _external_accuracy(r.metrics)
        return
    for i, q in enumerate(r.requests):
        if q.error_kind is None and q.output_text is not None:
            expected = workload.score(q.id, q.output_text)
            if (expected or {}) != q.scores or q.correct != (next(iter(expected.values())) if expected else None):
                yield Finding(f"requests.{i}.scores", q.scores, expected, "re-scored with the task's scorer")
    derived = Metrics()
    metrics.accuracy(derived, r.requests, workload.scoring.metric if workload.scoring else None)
    yield from _compare("metrics", r.metrics, derived, ("accuracy", "accuracy_metric", "accuracy_n",
                                                        "accuracy_ci95_low", "accuracy_ci95_high",
                                                        "accuracy_by_metric"))


def _external_accuracy(m: Metrics) -> Iterator[Finding]:
    """An outside harness's score: the first of its metrics, with the interval its n gives."""
    derived = Metrics(accuracy_by_metric=m.accuracy_by_metric, accuracy_n=m.accuracy_n)
    if m.accuracy_by_metric:
        metrics.external_accuracy(derived, metrics.ExternalScore("the harness", dict(m.accuracy_by_metric),
                                                                 m.accuracy_n or 0))
    yield from _compare("metrics", m, derived, ("accuracy", "accuracy_metric", "accuracy_ci95_low",
                                                "accuracy_ci95_high"), "the harness's own scores and n")


def _request_ids(r: RunResult, workload: Any) -> Iterator[Finding]:
    """The records are the workload's requests, each once: the warm-up ones its first, the measured ones the
    next in order (requests are sent in order, so a run cut short sent a prefix), with its max_tokens."""
    wanted = {q.id: q for q in workload.requests}
    ids = [q.id for q in r.requests]
    if len(set(ids)) != len(ids) or not set(ids) <= set(wanted):
        odd = sorted({i for i in ids if ids.count(i) > 1 or i not in wanted})[:5]
        yield Finding("requests", odd, "each of the workload's request ids once", "records that are not the "
                                                                                 "workload's requests")
        return
    order = [q.id for q in workload.requests]
    warm = order[:r.workload.warmup_requests]
    for phase, expected in ((True, warm), (False, order[len(warm):])):
        sent = {q.id for q in r.requests if q.warmup == phase}
        if sent != set(expected[:len(sent)]):
            missing = [i for i in expected[:len(sent)] if i not in sent][:5]
            yield Finding("requests", sorted(sent - set(expected[:len(sent)]))[:5], f"also {missing}",
                          f"the {'warm-up' if phase else 'measured'} requests are not the workload's first ones "
                          f"in order (a request dropped from the records?)")
    for i, q in enumerate(r.requests):
        if q.max_tokens is not None and q.max_tokens != wanted[q.id].max_tokens:
            yield Finding(f"requests.{i}.max_tokens", q.max_tokens, wanted[q.id].max_tokens, "the workload's")
        shared = wanted[q.id].shared_prefix_tokens
        if not q.warmup and not q.session and q.shared_prefix_tokens != shared:
            yield Finding(f"requests.{i}.shared_prefix_tokens", q.shared_prefix_tokens, shared, "the workload's")


def _task(name: str, tasks: Mapping[str, Any]) -> Any:
    """The installed task of that name (``family:variant`` through the family), or None."""
    task = tasks.get(name)
    family, sep, variant = name.partition(":")
    if task is None and sep and tasks.get(family) is not None:
        try:
            task = tasks[family].variant(variant)
        except CapbenchError:
            return None
    return task


def _workload(r: RunResult, tasks: Mapping[str, Any]) -> tuple[Any, str]:
    """The run's workload rebuilt by its task, or None and why it cannot be (which refuses the run)."""
    from capbench_core.contract.backend import ModelRef

    task = _task(r.workload.task, tasks)
    if task is None:
        return None, (f"task {r.workload.task!r} is not installed here, so its workload cannot be rebuilt to check "
                      f"the request ids and verdicts (install the plugin that provides it)")
    try:
        workload = _build(task, r.workload.num_requests, r.workload.warmup_requests,
                          tuple(sorted((k, str(v)) for k, v in r.workload.params.items())),
                          ModelRef(r.model.name, Path(r.model.path)))
    except (CapbenchError, OSError, ValueError, TypeError, LookupError) as exc:
        return None, f"the task cannot rebuild the workload here ({str(exc)[:200]})"
    if workload.hash() != r.workload.hash:
        return None, f"the task rebuilds workload {workload.hash()} from the run's parameters"
    return workload, ""


@lru_cache(maxsize=32)
def _build(task: Any, n: int, warmup: int, params: tuple[tuple[str, str], ...], model: Any) -> Any:
    from capbench_core.contract.task import build_workload

    return build_workload(task, model, n, warmup, dict(params))


def _spec(r: RunResult) -> ModelSpec | None:
    """The model's analytics from the config the run carries; None when there is none or it cannot be
    counted (a hostile config included)."""
    if r.model.config is None:
        return None
    try:
        return spec_from_config(r.model.config, r.model.name)
    except (CapbenchError, ArithmeticError, LookupError, TypeError, ValueError, AttributeError):
        return None


MODEL_COUNTS = ("total_params", "active_params", "active_params_no_embed", "num_experts", "top_k", "sparsity")


def _model(r: RunResult) -> Iterator[Finding]:
    """The model record against the counts capbench computes from the config it carries; without a config
    it can count, every count must be null (and S-MBU, S-MFU, the weights' size with them)."""
    spec = _spec(r)
    if r.engine is not None and r.model.dtype != (r.engine.weight_dtype or "unknown"):
        yield Finding("model.dtype", r.model.dtype, r.engine.weight_dtype or "unknown", "the dtype the engine served")
    why = "counted from the model's own config" if spec else "no model config the analytics can count"
    for name in MODEL_COUNTS:  # a null count claims nothing
        stated, derived = getattr(r.model, name), getattr(spec, name) if spec else None
        if stated is not None and not _same(stated, derived):
            yield Finding(f"model.{name}", stated, derived, why)
    if spec is not None and r.model.total_params is not None and r.model.architecture != spec.architecture:
        yield Finding("model.architecture", r.model.architecture, spec.architecture, why)
    predicted = r.metrics.weights_gb_predicted
    expected = spec.weight_bytes(r.model.dtype) / 1e9 if spec and r.model.dtype in DTYPE_BYTES else None
    if predicted is not None and not _same(predicted, expected):
        yield Finding("metrics.weights_gb_predicted", predicted, expected,
                      f"every weight of the model's config in {r.model.dtype}" if expected else why)


def _shares(hw: Any, accelerator: list[float | None], cpu: list[float | None]) -> set[float]:
    """The peaks a row may divide by: the CPU's, and the accelerators' for 1..n of the n visible devices (a run
    using tp=2 of 8 GPUs divides by two GPUs' peaks)."""
    counts = [d.count for d in hw.devices if d.kind != "cpu"]
    n = counts[0] if counts else 1
    out = {v for v in cpu if v}
    out |= {v * k / n for v in accelerator if v for k in range(1, n + 1)}
    return out


def _peaks(r: RunResult) -> Iterator[Finding]:
    """The peaks a row divides by must be its hardware's own (or a part of its accelerators')."""
    m, hw = r.metrics, r.hardware
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


STEP_FIELDS = (*EFFICIENCY_FIELDS, *ACTIVATION_FIELDS, "peak_mem_bw_gbps", "peak_flops_tflops")


def _efficiency(r: RunResult) -> Iterator[Finding]:
    """S-MBU and S-MFU from the stored decode steps, the model's config and the peaks the run states (its
    hardware's own), by the runner's own code (``figures.efficiency``) in the bytes the engine served. Without
    decode steps or a config to count, every such figure must be null; a utilisation the steps would put
    above 1 (beyond a margin for caches) is refused, not blanked."""
    from capbench_core.contract.backend import DecodeSource

    m, steps = r.metrics, r.decode_steps
    spec = _spec(r)
    yield from _peaks(r)
    if steps is None or spec is None:
        why = "no decode steps in the run" if steps is None else "no model config the analytics can count"
        yield from _compare("metrics", m, Metrics(), STEP_FIELDS, f"{why} to re-derive it from")
        return
    try:
        dtype, kv_dtype, wb = figures.served_bytes(r.engine)
    except TypeError as exc:
        yield Finding("engine.weight_bytes", r.engine.weight_bytes if r.engine else None, None,
                      f"not bytes per weight: {exc}")
        return
    recorded, served = (steps.dtype, steps.kv_dtype, steps.weight_bytes), (dtype or "unknown", kv_dtype,
                                                                             wb.record() if wb else None)
    if not _same(list(recorded), list(served)):
        yield Finding("decode_steps.dtype", list(recorded), list(served),
                      "the steps count bytes as the engine served them (weight dtype, KV dtype, bytes per weight)")
        return
    derived = Metrics()
    found = DecodeSource(metrics.stored_steps(steps), steps.source, steps.method)
    figures.efficiency(derived, spec, found, r.engine, figures.Peaks(m.peak_mem_bw_gbps, m.peak_flops_tflops),
                       r.placement, r.hardware)
    yield from _utilisation(m, derived)
    yield from _compare("metrics", m, derived, STEP_FIELDS)


def _utilisation(m: Metrics, derived: Metrics) -> Iterator[Finding]:
    """The share of the stated peaks the decode steps would use, before the runner blanks one above 1."""
    step_s = (derived.decode_step_ms_mean or 0) / 1e3
    if step_s <= 0:
        return
    raw: dict[str, float] = {}
    if derived.s_mbu_tiers:
        raw.update({f"s_mbu_tiers.{tier}": value for tier, value in derived.s_mbu_tiers.items()})
    elif derived.bytes_per_decode_step_mean and m.peak_mem_bw_gbps:
        raw["s_mbu"] = derived.bytes_per_decode_step_mean / step_s / (m.peak_mem_bw_gbps * 1e9)
    if derived.flops_per_decode_step_mean and m.peak_flops_tflops:
        raw["s_mfu"] = derived.flops_per_decode_step_mean / step_s / (m.peak_flops_tflops * 1e12)
    for name, value in raw.items():
        if value > 1 + CACHE_MARGIN:
            yield Finding(f"metrics.{name}", getattr(m, name.split(".")[0]), f"<= {1 + CACHE_MARGIN:g}",
                          f"the decode steps would use {value:.3g}x the stated peak: faster than the hardware "
                          f"allows")


WORKLOAD_FIELDS = ("schedule_lag_ms_p50", "schedule_lag_ms_p99", "schedule_lag_ms_max", "ttft_from_scheduled_ms_p50",
                   "ttft_from_scheduled_ms_p99", "ttft_ms_p50_first_turn", "ttft_ms_p50_later_turns",
                   "prefix_cache_ceiling", "prefix_cache_hit_rate")


def _workload_shape(r: RunResult) -> Iterator[Finding]:
    """Schedule lag, per-turn TTFT and the prefix-cache figures from the records; a later turn's shared prefix
    is its conversation's previous turn (prompt and reply), as the load generator sends it."""
    turns = {(q.session, q.turn): q for q in r.requests if q.session and q.turn}
    for i, q in enumerate(r.requests):
        before = turns.get((q.session, (q.turn or 0) - 1)) if q.session else None
        if before is not None and q.shared_prefix_tokens != (before.prompt_tokens or 0) + (before.output_tokens or 0):
            yield Finding(f"requests.{i}.shared_prefix_tokens", q.shared_prefix_tokens,
                          (before.prompt_tokens or 0) + (before.output_tokens or 0), "the previous turn's prompt "
                                                                                     "and reply")
    derived = Metrics()
    metrics.workload_figures(derived, r.requests)
    yield from _compare("metrics", r.metrics, derived, WORKLOAD_FIELDS)


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
    """$/Mtok (output tokens, and all tokens) from the stated hourly price and the (re-derived) throughputs;
    without a price, or a throughput, the cost must be null."""
    m = r.metrics
    price = m.price_usd_per_hour
    derived = Metrics()
    if price is not None and m.output_tok_per_s:
        derived.cost_usd_per_mtok = price / (m.output_tok_per_s * 3600) * 1e6
    if price is not None and m.total_tok_per_s:
        derived.cost_usd_per_mtok_all = price / (m.total_tok_per_s * 3600) * 1e6
    why = f"${price:g}/h at the stated throughput" if price is not None else "a cost without a stated price"
    yield from _compare("metrics", m, derived, ("cost_usd_per_mtok", "cost_usd_per_mtok_all"), why)
    if price is not None and (m.cost_model is None or m.cost_basis is None):
        yield Finding("metrics.cost_basis", m.cost_basis, "given | price_table | capex | estimate",
                      "a price without the cost model it came from")


def _energy(r: RunResult) -> Iterator[Finding]:
    """J per output token from the (reported) energy and the re-derived output tokens; null without energy."""
    m = r.metrics
    expected = m.energy_j / m.output_tokens_total if m.energy_j is not None and m.output_tokens_total else None
    if not _same(m.energy_j_per_output_token, expected):
        yield Finding("metrics.energy_j_per_output_token", m.energy_j_per_output_token, expected,
                      "the stated energy over the output tokens" if m.energy_j is not None
                      else "a per-token energy without an energy reading")
    if m.energy_j is not None and not m.energy_source:
        yield Finding("metrics.energy_source", m.energy_source, "the counter", "an energy reading without its source")


def _client(r: RunResult) -> Iterator[Finding]:
    """client_limited from the (reported) lag and CPU of the busiest client process: a row cannot call its
    client healthy against its own figures, nor without them."""
    m = r.metrics
    if m.client_limited is None:
        return
    if m.client_lag_ms_p99 is None or m.client_cpu_share is None:
        yield Finding("metrics.client_limited", m.client_limited, None,
                      "a verdict on the client without the lag and CPU it is judged from")
    elif m.client_limited != limited(m.client_lag_ms_p99, m.client_cpu_share):
        yield Finding("metrics.client_limited", m.client_limited, not m.client_limited,
                      f"lag p99 {m.client_lag_ms_p99:.3g} ms and CPU {m.client_cpu_share:.0%} against the thresholds "
                      f"({LAG_P99_MS:g} ms, {CPU_SHARE:.0%})")


#: Every figure of Metrics that a rule above re-derives or bounds, and the texts that only explain one.
CHECKED_METRICS = frozenset({
    *LATENCY_FIELDS, *STEP_FIELDS, *ROUTING_FIELDS, *WORKLOAD_FIELDS, "duration_s", "goodput_rps", "slo_attainment",
    "accuracy",
    "accuracy_metric", "accuracy_n", "accuracy_ci95_low", "accuracy_ci95_high", "accuracy_by_metric",
    "weights_gb_predicted", "cost_usd_per_mtok", "cost_usd_per_mtok_all", "cost_basis", "energy_j_per_output_token",
    "energy_source", "cost_model", "mem_method", "notes", "unverified", "client_limited"})
