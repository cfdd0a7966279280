"""The figures of one measured window, from its raw records: which decode steps S-MBU/S-MFU use when the
engine gives none, whose peaks they divide by, and the efficiency, energy, cost and goodput figures. The
runner measures; this module computes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from capbench_core.analytics import cost, metrics
from capbench_core.analytics.datasheets import match_accelerator
from capbench_core.analytics.model_spec import ModelSpec
from capbench_core.analytics.weights import DTYPE_BYTES, WeightBytes
from capbench_core.contract.backend import DecodeSource, DecodeWindow
from capbench_core.contract.records import EngineInfo, HardwareSpec, Metrics, Placement, Routing
from capbench_core.contract.window import WindowReport

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
    shares = None if serial else window.routing_shares
    steps = metrics.client_side_steps(ok_records, spec, serial, span, shares)
    method = SERIAL_METHOD if serial else measured_estimate(window) if shares else UNIFORM_METHOD
    return DecodeSource(steps, "estimated", method)


def measured_estimate(window: DecodeWindow) -> str:
    return (f"estimated from {window.routing_from}'s measured routing of the same model and workload: "
            f"sum_e 1-(1-s_e)^B with its per-expert shares s_e, B = requests decoding at once")


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
                                      em.decode_batch_mean, window.routing_shares)
    if window.routing_shares:
        method = f"{method}; A instead {measured_estimate(window)}"
    return DecodeSource(steps, "estimated", method) if steps else None


@dataclass(frozen=True)
class Peaks:
    """The peaks a row's S-MBU/S-MFU divide by: the host CPU's for a CPU backend, else the accelerator's."""

    mem_bw_gbps: float | None
    tflops: float | None


def peaks_for(hardware: HardwareSpec, on_cpu: bool, dtype: str | None, devices: int | None = None) -> Peaks:
    """The host CPU's peaks for a CPU backend; else the accelerators', scaled to the ``devices`` the run uses
    (the datasheet peak of the spec is summed over every visible device of the kind)."""
    bw = hardware.cpu_peak_mem_bw_gbps if on_cpu and hardware.cpu_peak_mem_bw_gbps else hardware.peak_mem_bw_gbps
    flops = (hardware.cpu_peak_flops_tflops if on_cpu else hardware.peak_flops_tflops).get(dtype or "")
    share = 1.0
    visible = [d.count for d in hardware.devices if d.kind != "cpu"]
    if not on_cpu and devices and visible:
        share = min(devices, visible[0]) / visible[0]
    return Peaks(bw.value * share if bw.value else bw.value, flops.value * share if flops and flops.value else None)


def served_bytes(engine: EngineInfo | None) -> tuple[str | None, str | None, WeightBytes | None]:
    """(weight dtype, KV dtype, bytes per weight) as the engine served them; Nones where it does not say."""
    if engine is None:
        return None, None, None
    wb = WeightBytes(**engine.weight_bytes) if engine.weight_bytes else None
    kv = engine.kv_dtype if engine.kv_dtype in DTYPE_BYTES else None
    return engine.weight_dtype, kv, wb


def efficiency(m: Metrics, spec: ModelSpec, found: DecodeSource, engine: EngineInfo | None, peaks: Peaks,
               placement: Placement | None = None, hardware: HardwareSpec | None = None) -> None:
    """S-MBU and S-MFU of the window's decode steps, in the bytes the engine served (its weight dtype, or per
    class its GGUF's tensor types or its checkpoint's quantization); null with the reason when the dtype is
    unknown (never counted in a guessed one)."""
    dtype, kv_dtype, wb = served_bytes(engine)
    if dtype is None or dtype not in DTYPE_BYTES:
        why = ("the served weight dtype is unknown (an attached server that does not say which); pass the "
               "backend's dtype option" if dtype is None else f"bytes per weight of dtype {dtype!r} are unknown")
        metrics.sparse_efficiency(m, spec, found.steps, found.source, found.method, "float32", None, None)
        m.s_mbu = m.s_mfu = m.bytes_per_decode_step_mean = m.flops_per_decode_step_mean = None
        m.peak_mem_bw_gbps = m.peak_flops_tflops = None
        m.notes["s_mbu"] = m.notes["s_mfu"] = why
        return
    metrics.sparse_efficiency(m, spec, found.steps, found.source, found.method, dtype, peaks.mem_bw_gbps,
                              peaks.tflops, kv_dtype, wb)
    if hardware is not None and dtype is not None and m.s_mbu is not None:
        metrics.tiered_mbu(m, spec, found.steps, dtype, placement, tier_bandwidths(hardware, peaks.mem_bw_gbps),
                           kv_dtype, wb)


def routing(m: Metrics, found: DecodeSource, report: WindowReport | None, spec: ModelSpec,
            options: Mapping[str, Any]) -> Routing | None:
    """The row's measured per-expert loads over the window — the engine's own decode steps (torch_moe) or its
    recorder's decode passes (SGLang) — and the routing figures from them; None where not measured."""
    tokens: list[list[int]] | None = None
    method = ""
    if found.source == "measured" and found.steps and found.steps[0].expert_tokens:
        layers = len(found.steps[0].expert_tokens)
        tokens = [[sum(s.expert_tokens[layer][e] for s in found.steps) for e in range(spec.num_experts)]
                  for layer in range(layers)]
        method = f"the engine's router counts over {len(found.steps)} decode steps of the window"
    elif report is not None and report.expert_tokens:
        tokens = [list(layer) + [0] * (spec.num_experts - len(layer)) for layer in report.expert_tokens]
        method = report.expert_method
    if not tokens:
        return None
    forced = str(options.get("simulate_routing")) if options.get("simulate_routing") else None
    record = Routing(method=method, tokens=tokens, forced=forced)
    routing_metrics(m, record)
    return record


def routing_metrics(m: Metrics, record: Routing) -> None:
    """imbalance (mean and worst layer), hot-expert share and the EP tax, from a routing record."""
    from capbench_core.analytics.routing import summary

    figures = summary(record.tokens)
    m.routing_imbalance_mean, m.routing_imbalance_max = figures.imbalance_mean, figures.imbalance_max
    m.routing_hot_share, m.ep_tax = figures.hot_share, figures.ep_tax
    if record.forced:
        m.notes["routing"] = f"the engine's routing was overridden ({record.forced}): these are its simulation's loads"


def tier_bandwidths(hardware: HardwareSpec, device_bw: float | None) -> dict[str, float | None]:
    """Bandwidth (GB/s) of each memory tier and link a tiered S-MBU divides by: the device memory (the run's
    peak), host DRAM (the host's measured peak) and PCIe (the accelerator's datasheet link, data/links.json)."""
    from capbench_core.analytics.datasheets import links

    host = hardware.cpu_peak_mem_bw_gbps.value if hardware.cpu_peak_mem_bw_gbps else None
    pcie = None
    accel = [d for d in hardware.devices if d.kind != "cpu"]
    row = match_accelerator(accel[0].model) if accel else None
    if row and row.get("pcie"):
        pcie = float(links()[row["pcie"]]["gbps"]) * accel[0].count
    return {"device_mem": device_bw, "host_dram": host, "pcie": pcie}


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


@dataclass(frozen=True)
class MemoryNeed:
    """What an engine must hold before it serves a token: weights and the KV cache the run can fill."""

    weights_bytes: float
    kv_bytes: float
    dtype: str

    @property
    def total(self) -> float:
        return self.weights_bytes + self.kv_bytes

    def says(self, sequences: int, context: int) -> str:
        return (f"{self.total / 1e9:.2f} GB: weights {self.weights_bytes / 1e9:.2f} GB in {self.dtype} + KV cache "
                f"{self.kv_bytes / 1e9:.2f} GB for {sequences} sequence(s) of {context} tokens")


def memory(m: Metrics, peak_bytes: int | None, method: str, device_bytes: int | None, kv_capacity: int | None,
           need: MemoryNeed | None) -> None:
    """The row's memory: the measured peak of the engine's processes (``method`` says how, or why there is
    none), GPU memory on CUDA, the KV capacity the engine reports, and the analytics' prediction beside them."""
    m.kv_capacity_tokens = kv_capacity
    if need is not None:
        m.weights_gb_predicted, m.kv_gb_predicted = need.weights_bytes / 1e9, need.kv_bytes / 1e9
    if peak_bytes is None:
        m.notes["mem_peak_gb"] = method
        return
    m.mem_peak_gb, m.mem_method = peak_bytes / 1e9, method
    if device_bytes is not None:
        m.device_mem_peak_gb = device_bytes / 1e9


def memory_need(spec: ModelSpec, dtype: str, sequences: int, context: int) -> MemoryNeed:
    """Weights in ``dtype`` plus the KV cache of ``sequences`` sequences of ``context`` tokens (a lower bound:
    the engine's own runtime, activations and allocator slack come on top)."""
    kv_dtype = dtype if dtype in ("float32", "bfloat16", "float16") else "bfloat16"
    return MemoryNeed(spec.weight_bytes(dtype), sequences * spec.kv_bytes_at_context(context, kv_dtype), dtype)
