"""Where an MoE's weights live, and what one decode step moves over each resource: a tiered bytes model.

Resources are device memory (HBM), host memory (DRAM, all sockets), PCIe, NVLink and InfiniBand, and the two
places that compute (the accelerator, the host CPU). A :class:`Placement` says where the routed experts sit and
how they are used — on the device; in host memory computed by the CPU (llama.cpp ``--n-cpu-moe``,
KTransformers); in host memory fetched over PCIe to the device (vLLM/SGLang ``--cpu-offload-gb``,
MoE-Infinity) — for how many MoE layers, and the expert-parallel layout (EP ranks over NVLink or
InfiniBand). Attention, dense MLPs, shared experts, embeddings and the KV cache stay where the compute is.

For one decode step at batch B per rank:

- experts touched per MoE layer: measured (a row's router counts) or E(1-(1-k/E)^n) for the n tokens the
  layer routes (uniform routing: an estimate, labelled);
- bytes per resource: dense weights and KV on the device (on the host when there is no device), the touched
  experts on the tier they sit on, PCIe traffic of fetched experts and of the activations sent to and back
  from host-computed experts, EP dispatch and combine over the link (DeepEP's per-token sizes);
- a time bound per resource (bytes / bandwidth, FLOPs / peak), composed overlapped (max: every resource busy
  at once) and serial (sum: one after the other, as hybrid CPU-expert decode runs layer by layer), the
  bottleneck resource, and tokens/s = ranks x B / step time.

The bound ignores kernel launches, synchronisation and imbalance beyond the routing itself; measured systems
reach a fraction of it (``docs/placement.md`` lists published anchors and their fractions).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from capbench_core.analytics.model_spec import ModelSpec
from capbench_core.analytics.sparsity import expected_distinct_experts
from capbench_core.analytics.weights import DTYPE_BYTES
from capbench_core.errors import CapbenchError

ExpertTier = Literal["device", "host_compute", "host_fetch"]
RESOURCES = ("device_mem", "device_compute", "host_dram", "host_compute", "pcie", "nvlink", "infiniband")
#: DeepEP's dispatch payload per token and expert copy: FP8 hidden state, one float32 scale per 128 values,
#: and 16 bytes of routing metadata (DeepEP README, "normal kernels"); combine returns BF16.
FP8_SCALE_BLOCK = 128
DISPATCH_METADATA_BYTES = 16


def dispatch_bytes_per_token(top_k: int, hidden: int, fp8: bool = True) -> float:
    """Bytes one token sends to its top-k experts' ranks in an EP dispatch (FP8 with scales, or BF16)."""
    per_copy = hidden + hidden / FP8_SCALE_BLOCK * 4 + DISPATCH_METADATA_BYTES if fp8 else 2 * hidden
    return top_k * per_copy


def combine_bytes_per_token(top_k: int, hidden: int) -> float:
    """Bytes the experts' ranks send back for one token in an EP combine (BF16 outputs)."""
    return top_k * 2 * hidden


@dataclass(frozen=True)
class System:
    """The hardware a placement runs on. ``devices`` = 0: a CPU-only machine (everything in host memory).

    Bandwidths are per device and per direction (GB/s), FLOP/s in TFLOP/s, memories in GB; ``sources`` says
    where each came from (datasheet row, measurement)."""

    name: str
    devices: int
    host_dram_gbps: float
    host_tflops: float | None
    host_memory_gb: float | None = None
    device_mem_gbps: float | None = None
    device_tflops: float | None = None
    device_memory_gb: float | None = None
    pcie_gbps: float | None = None
    nvlink_gbps: float | None = None
    infiniband_gbps: float | None = None
    usd_per_hour: float | None = None
    price_source: str = "no price"
    sources: dict[str, str] = field(default_factory=dict)

    def bandwidth(self, resource: str) -> float | None:
        return {"device_mem": self.device_mem_gbps, "host_dram": self.host_dram_gbps, "pcie": self.pcie_gbps,
                "nvlink": self.nvlink_gbps, "infiniband": self.infiniband_gbps}.get(resource)


@dataclass(frozen=True)
class Placement:
    """Where the routed experts sit and how they run; everything else stays with the compute."""

    name: str
    experts: ExpertTier = "device"
    #: MoE layers whose experts sit on the host (None: all of them when ``experts`` is not "device")
    host_layers: int | None = None
    ep: int = 1
    ep_link: Literal["nvlink", "infiniband"] | None = None
    #: tensor parallelism: every weight and the KV cache split over this many devices, which serve one batch
    tp: int = 1
    fp8_dispatch: bool = True
    #: "serial": the tiers work one after the other (hybrid CPU-expert decode); "overlapped": at once
    composition: Literal["serial", "overlapped"] | None = None

    def composed(self) -> str:
        return self.composition or ("serial" if self.experts == "host_compute" else "overlapped")


@dataclass
class StepModel:
    """One decode step under one placement: bytes and time per resource, the bound, what it costs."""

    placement: str
    batch: int
    ranks: int
    experts_per_layer: float
    experts_source: str
    bytes: dict[str, float]
    flops: dict[str, float]
    seconds: dict[str, float]
    overlapped_s: float
    serial_s: float
    composition: str
    bottleneck: str
    tok_per_s: float
    memory_per_device_gb: float | None
    host_memory_gb: float
    fits: bool
    usd_per_mtok: float | None
    notes: list[str] = field(default_factory=list)

    @property
    def step_s(self) -> float:
        return self.serial_s if self.composition == "serial" else self.overlapped_s

    def record(self) -> dict[str, Any]:
        return {**asdict(self), "step_ms": self.step_s * 1e3}


def _touched(spec: ModelSpec, tokens: float, measured: float | None) -> tuple[float, str]:
    if measured is not None:
        return measured, "measured"
    if not spec.is_moe:
        return 0.0, "dense model"
    return (expected_distinct_experts(spec.num_experts, spec.top_k, max(tokens, 1.0)),
            "estimated: uniform routing, E(1-(1-k/E)^n)")


def step_model(spec: ModelSpec, placement: Placement, system: System, batch: int, context: int,
               dtype: str = "bfloat16", kv_dtype: str | None = None,
               experts_per_layer: float | None = None) -> StepModel:
    """The bound of one decode step at ``batch`` sequences per rank, each attending to ``context`` tokens."""
    if dtype not in DTYPE_BYTES:
        raise CapbenchError(f"bytes per weight of {dtype!r} are unknown (known: {', '.join(DTYPE_BYTES)})")
    w = DTYPE_BYTES[dtype]
    kv = DTYPE_BYTES[kv_dtype or (dtype if dtype in ("float32", "bfloat16", "float16") else "bfloat16")]
    ranks, tp = max(placement.ep, 1), max(placement.tp, 1)
    if system.devices == 0 and (placement.experts != "device" or ranks > 1 or tp > 1):
        raise CapbenchError(f"placement {placement.name!r} needs accelerators; {system.name} has none")
    if ranks * tp > max(system.devices, 1):
        raise CapbenchError(f"placement {placement.name!r} spreads the model over {ranks * tp} devices; "
                            f"{system.name} has {system.devices}")
    moe_layers = spec.moe_layers if spec.is_moe else 0
    host_layers = 0 if placement.experts == "device" else min(
        moe_layers, moe_layers if placement.host_layers is None else placement.host_layers)
    device_layers = moe_layers - host_layers
    # Each rank's batch routes through every layer; with EP a layer's experts see all ranks' tokens.
    touched, source = _touched(spec, batch * ranks, experts_per_layer)
    expert_bytes = spec.expert_params * w
    expert_flops_per_token = 2 * spec.expert_params * spec.top_k
    dense = spec.dense_read_params() * w + batch * spec.hidden_size * w  # routed experts apart; + B embedding rows
    kv_read = batch * spec.kv_bytes_at_context(context, _kv_name(kv))
    dense_flops = batch * (spec.matmul_flops_per_token() - moe_layers * expert_flops_per_token) \
        + 2 * (spec.attn_score_dim + spec.attn_value_dim) * batch * spec.attended_tokens(context)
    b: dict[str, float] = dict.fromkeys(RESOURCES, 0.0)
    f: dict[str, float] = {"device_compute": 0.0, "host_compute": 0.0}
    on_device = system.devices > 0
    home, compute = ("device_mem", "device_compute") if on_device else ("host_dram", "host_compute")
    b[home] += (dense + kv_read + device_layers * touched / ranks * expert_bytes) / tp
    f[compute] += (dense_flops + device_layers * batch * expert_flops_per_token) / tp
    if tp > 1:  # two all-reduces of the activations per layer (attention out, MLP out), ring: 2(n-1)/n each way
        link = "nvlink" if system.nvlink_gbps else "pcie"
        b[link] += 2 * spec.num_layers * batch * spec.hidden_size * 2 * 2 * (tp - 1) / tp
    if host_layers:
        host_bytes = host_layers * touched * expert_bytes
        if placement.experts == "host_compute":
            b["host_dram"] += host_bytes
            f["host_compute"] += host_layers * batch * expert_flops_per_token
            b["pcie"] += host_layers * batch * spec.hidden_size * w * 2  # activations there and back
        else:  # fetched over PCIe (each device its share, over its own link), computed on the device
            b["pcie"] += host_bytes / tp
            f["device_compute"] += host_layers * batch * expert_flops_per_token
    if ranks > 1:
        link = placement.ep_link or "nvlink"
        remote = (ranks - 1) / ranks
        per_token = (dispatch_bytes_per_token(spec.top_k, spec.hidden_size, placement.fp8_dispatch)
                     + combine_bytes_per_token(spec.top_k, spec.hidden_size))
        b[link] += device_layers * batch * per_token * remote
    seconds = _seconds(b, f, system)
    overlapped, serial = max(seconds.values(), default=0.0), _serial(seconds)
    composition = placement.composed()
    step = serial if composition == "serial" else overlapped
    bottleneck = max(seconds, key=lambda r: seconds[r]) if seconds else "none"
    tok_s = ranks * batch / step if step > 0 else math.inf
    weights = spec.weight_bytes(dtype) if dtype in DTYPE_BYTES else 0.0
    routed_total = moe_layers * spec.num_experts * expert_bytes
    host_resident = host_layers * spec.num_experts * expert_bytes
    kv_total = batch * spec.kv_bytes_at_context(context, _kv_name(kv))
    if on_device:
        per_device = ((weights - routed_total) + (routed_total - host_resident) / ranks + kv_total) / tp
        mem_dev: float | None = per_device / 1e9
        host_gb = host_resident / 1e9
        fits = per_device / 1e9 <= (system.device_memory_gb or math.inf) and host_gb <= (
            system.host_memory_gb or math.inf)
    else:
        mem_dev, host_gb = None, (weights + kv_total) / 1e9
        fits = host_gb <= (system.host_memory_gb or math.inf)
    usd = system.usd_per_hour / (tok_s * 3600) * 1e6 if system.usd_per_hour and math.isfinite(tok_s) else None
    notes = [f"{r}: no {'peak FLOP/s' if r.endswith('compute') else 'bandwidth'} known for {system.name}, so it "
             f"bounds nothing here" for r in RESOURCES if (b.get(r) or f.get(r)) and r not in seconds]
    return StepModel(placement.name, batch, ranks, touched, source, {k: v for k, v in b.items() if v},
                     {k: v for k, v in f.items() if v}, seconds, overlapped, serial, composition, bottleneck,
                     tok_s, mem_dev, host_gb, fits, usd, notes)


def _kv_name(kv_bytes: float) -> str:
    return next(name for name in ("float32", "bfloat16", "fp8") if DTYPE_BYTES[name] == kv_bytes)


def _seconds(b: dict[str, float], f: dict[str, float], system: System) -> dict[str, float]:
    out = {}
    for resource, value in b.items():
        bw = system.bandwidth(resource)
        if value and bw:
            out[resource] = value / (bw * 1e9)
    peaks = {"device_compute": system.device_tflops, "host_compute": system.host_tflops}
    for resource, value in f.items():
        peak = peaks[resource]
        if value and peak:
            out[resource] = value / (peak * 1e12)
    return out


def _serial(seconds: dict[str, float]) -> float:
    """Tiers one after the other: per place (device, host, each link) its own max of memory and compute."""
    device = max(seconds.get("device_mem", 0.0), seconds.get("device_compute", 0.0))
    host = max(seconds.get("host_dram", 0.0), seconds.get("host_compute", 0.0))
    return device + host + sum(seconds.get(r, 0.0) for r in ("pcie", "nvlink", "infiniband"))
