"""The figures of one measured window, from its raw records: which decode steps S-MBU/S-MFU use when the
engine gives none, whose peaks they divide by, and the efficiency, energy, cost and goodput figures. The
runner measures; this module computes."""

from __future__ import annotations

from dataclasses import dataclass

from capbench_core.analytics import cost, metrics
from capbench_core.analytics.datasheets import match_accelerator
from capbench_core.analytics.model_spec import DTYPE_BYTES, ModelSpec
from capbench_core.contract.backend import DecodeSource, DecodeWindow
from capbench_core.contract.records import HardwareSpec, Metrics

SERIAL_METHOD = ("batch of 1 (the engine serves one request at a time): top_k experts per layer; step time = "
                 "window / output tokens (includes prefill: S-MBU is a lower bound)")
UNIFORM_METHOD = ("uniform routing E(1-(1-k/E)^B), B = requests decoding at once (client view); steps = client "
                  "inter-token gaps")


def client_decode_steps(window: DecodeWindow, spec: ModelSpec, serial: bool) -> DecodeSource:
    """Decode steps when the engine times none itself: the client's inter-token gaps, with a recorder's
    measured A when the window report carries one (SGLang), else the uniform-routing estimate."""
    report = window.report
    ok_records = list(window.records)
    span = window.end_ns - window.start_ns
    if report is not None and report.experts_per_layer:
        steps = metrics.client_side_steps(ok_records, spec, False, span)
        for step in steps:
            step.distinct_experts = list(report.experts_per_layer)
        return DecodeSource(steps, "measured", report.expert_method)
    steps = metrics.client_side_steps(ok_records, spec, serial, span)
    return DecodeSource(steps, "estimated", SERIAL_METHOD if serial else UNIFORM_METHOD)


def engine_decode_steps(window: DecodeWindow, method: str) -> DecodeSource | None:
    """Decode steps from an engine's own counters, for an engine whose stream reaches the client in bursts:
    its generated tokens in steps of its own mean decode batch, each its own mean inter-token time long, A the
    uniform-routing estimate at that batch. None when the engine did not report all three, or when a recorder
    measured A (the client's steps then carry the measured A)."""
    report = window.report
    if report is None or report.experts_per_layer:
        return None
    em = report.engine_metrics
    if not (em.decode_batch_mean and em.server_tpot_ms_mean and em.generation_tokens):
        return None
    steps = metrics.server_side_steps(window.records, window.model, em.generation_tokens, em.server_tpot_ms_mean,
                                      em.decode_batch_mean)
    return DecodeSource(steps, "estimated", method) if steps else None


@dataclass(frozen=True)
class Peaks:
    """The peaks a row's S-MBU/S-MFU divide by: the host CPU's for a CPU backend, else the accelerator's."""

    mem_bw_gbps: float | None
    tflops: float | None


def peaks_for(hardware: HardwareSpec, on_cpu: bool, dtype: str | None) -> Peaks:
    bw = hardware.cpu_peak_mem_bw_gbps if on_cpu and hardware.cpu_peak_mem_bw_gbps else hardware.peak_mem_bw_gbps
    flops = (hardware.cpu_peak_flops_tflops if on_cpu else hardware.peak_flops_tflops).get(dtype or "")
    return Peaks(bw.value, flops.value if flops else None)


def efficiency(m: Metrics, spec: ModelSpec, found: DecodeSource, dtype: str | None, peaks: Peaks) -> None:
    """S-MBU and S-MFU of the window's decode steps, in the served dtype's bytes; null with the reason when
    the dtype is unknown (never counted in a guessed one)."""
    if dtype is None or dtype not in DTYPE_BYTES:
        why = ("the served weight dtype is unknown (an attached server that does not say which); pass the "
               "backend's dtype option" if dtype is None else f"bytes per weight of dtype {dtype!r} are unknown")
        metrics.sparse_efficiency(m, spec, found.steps, found.source, found.method, "float32", None, None)
        m.s_mbu = m.s_mfu = m.bytes_per_decode_step_mean = m.flops_per_decode_step_mean = None
        m.peak_mem_bw_gbps = m.peak_flops_tflops = None
        m.notes["s_mbu"] = m.notes["s_mfu"] = why
        return
    metrics.sparse_efficiency(m, spec, found.steps, found.source, found.method, dtype, peaks.mem_bw_gbps,
                              peaks.tflops)


def tdp_w(hardware: HardwareSpec) -> float | None:
    """Datasheet TDP of the accelerators, for a labelled power estimate; None on CPU."""
    total = 0.0
    for d in hardware.devices:
        if d.kind == "cpu":
            continue
        row = match_accelerator(d.model)
        if row is None:
            return None
        total += row["tdp_w"] * d.count
    return total or None


def price(m: Metrics, model: cost.CostModel | None, hardware: HardwareSpec) -> None:
    """$/Mtok under the run's cost model; null with what to pass when the run has none."""
    missing = ("no price for this hardware: pass --price-usd-per-hour (renting) or --hardware-price-usd "
               f"(owning) for {hardware.label()!r}")
    cost.apply(m, model, tdp_w(hardware), missing)
