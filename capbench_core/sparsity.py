"""Sparsity study, analytic mode: what serving a sparser MoE costs, by roofline, on a given machine.

A family holds the active parameters per token fixed (same FLOPs per token) and
varies the number of experts E at a fixed top-k: E = 1 is the dense model whose
FFN is k experts wide. Members are Qwen3-MoE-layout configs, counted by
``model_spec``, so their figures are the same ones ``capbench model inspect``
gives.

For each member and decode batch B: expected distinct experts per MoE layer under
uniform routing, E(1 - (1 - k/E)^B) (an estimate, labelled as one); bytes read and
FLOPs per decode step (``metrics.decode_step_cost``: dense weights, the experts
hit, the KV cache at the given context); predicted step time = max(bytes / peak
bandwidth, FLOPs / peak FLOP/s) — the roofline, which ignores kernel launch and
communication overheads; tokens/s = B / step time; $/Mtok from the cheapest
price-table row for the accelerator, when one exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from capbench_core.backend import DecodeStep
from capbench_core.errors import CapbenchError
from capbench_core.metrics import decode_step_cost
from capbench_core.model_spec import ModelSpec, spec_from_config

BASE_SHAPE: dict[str, Any] = {
    "model_type": "qwen3_moe", "hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 16,
    "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 151936, "tie_word_embeddings": False,
    "decoder_sparse_step": 1, "mlp_only_layers": [],
}


@dataclass(frozen=True)
class Machine:
    """What the roofline needs: peaks, memory, and an hourly price if one is known."""

    name: str
    mem_bw_gbps: float
    tflops: float
    memory_gb: float
    usd_per_hour: float | None
    price_source: str
    peak_source: str


def expected_distinct_experts(num_experts: int, top_k: int, batch: int) -> float:
    """E(1 - (1 - k/E)^B): distinct experts one MoE layer reads when B tokens route uniformly."""
    return num_experts * (1 - (1 - top_k / num_experts) ** batch)


def family(active_params: float, experts: list[int], top_k: int,
           base: dict[str, Any] | None = None) -> list[ModelSpec]:
    """Members with ~``active_params`` active parameters per token and E experts each (E = 1: dense)."""
    shape = {**BASE_SHAPE, **(base or {})}
    bad = [e for e in experts if e != 1 and top_k > e]
    if bad:
        raise CapbenchError(f"top-k {top_k} is larger than {bad[0]} experts: each token needs k distinct "
                            f"experts; use --top-k <= {bad[0]} or drop E={bad[0]}")
    def active_at(inter: int) -> int:
        config = {**shape, "num_experts": top_k, "num_experts_per_tok": top_k, "moe_intermediate_size": inter,
                  "intermediate_size": inter}
        return spec_from_config(config, "probe").active_params

    per_unit = active_at(2) - active_at(1)  # active parameters per unit of expert width
    fixed = active_at(1) - per_unit  # attention, norms, router, embeddings: everything but the FFN
    width = (active_params - fixed) / per_unit
    if width < 1:
        raise CapbenchError(f"an active budget of {active_params:.3g} parameters is smaller than attention, "
                            f"norms and embeddings alone ({fixed:.3g}) in this layout; raise --active-params")
    inter = max(1, round(width))
    members = []
    for e in experts:
        k = 1 if e == 1 else top_k
        inter_e = inter * top_k if e == 1 else inter
        config = {**shape, "num_experts": e, "num_experts_per_tok": k, "moe_intermediate_size": inter_e,
                  "intermediate_size": inter_e}
        members.append(spec_from_config(config, f"E{e}-k{k}"))
    return members


@dataclass
class Row:
    name: str
    experts: int
    top_k: int
    sparsity: float
    total_params: int
    active_params: int
    weight_gb: float
    fits: bool
    by_batch: dict[int, dict[str, float | str | None]] = field(default_factory=dict)


def analyse(members: list[ModelSpec], machine: Machine, batches: list[int], dtype: str = "bfloat16",
            context_tokens: int = 1024) -> list[Row]:
    rows = []
    for spec in members:
        weight_gb = spec.weight_bytes(dtype) / 1e9
        row = Row(spec.name, spec.num_experts, spec.top_k, spec.sparsity, spec.total_params, spec.active_params,
                  weight_gb, weight_gb <= machine.memory_gb)
        for b in batches:
            a = expected_distinct_experts(spec.num_experts, spec.top_k, b) if spec.is_moe else 0.0
            step = DecodeStep(batch_size=b, step_ns=0, context_tokens=b * context_tokens,
                              distinct_experts=[a] * spec.moe_layers)
            cost = decode_step_cost(spec, step, dtype, dtype)
            t_mem, t_flop = cost.bytes / (machine.mem_bw_gbps * 1e9), cost.flops / (machine.tflops * 1e12)
            seconds = max(t_mem, t_flop)
            tok_s = b / seconds
            usd = machine.usd_per_hour / (tok_s * 3600) * 1e6 if machine.usd_per_hour else None
            row.by_batch[b] = {"experts_per_layer": a, "bytes": cost.bytes, "flops": cost.flops,
                               "step_ms": seconds * 1e3, "tok_per_s": tok_s, "usd_per_mtok": usd,
                               "bound": "memory" if t_mem >= t_flop else "compute"}
        rows.append(row)
    return rows


def machine_named(name: str, dtype: str = "bfloat16") -> Machine:
    """A datasheet accelerator by name (case-insensitive), priced by its cheapest price-table row."""
    from capbench_core.cost import rows_for
    from capbench_core.errors import unknown_name
    from capbench_core.hardware import datasheet

    rows = {str(r["name"]).lower(): r for r in datasheet()}
    row = rows.get(name.lower())
    if row is None:
        raise unknown_name("hardware", name, [str(r["name"]) for r in datasheet()] + ["here"])
    tflops = row["tflops"].get(dtype)
    if tflops is None:
        raise CapbenchError(f"the datasheet has no dense {dtype} peak for {row['name']}")
    prices = rows_for(str(row["name"]))
    price = prices[0] if prices else None
    return Machine(str(row["name"]), float(row["mem_bw_gbps"]), float(tflops), float(row["memory_gb"]),
                   price.usd_per_hour / price.gpus if price else None,
                   f"{price.id} (as of {price.as_of})" if price else "no price-table row",
                   f"datasheet: {row['source']}")


def machine_here(hw: Any) -> Machine:
    """This machine from its HardwareSpec: measured CPU peaks (fp32) or datasheet accelerator peaks."""
    bw, flops = hw.peak_mem_bw_gbps, hw.peak_flops_tflops
    dtype = "float32" if hw.compute_device == "cpu" else "bfloat16"
    peak = flops.get(dtype)
    if bw.value is None or peak is None or peak.value is None:
        raise CapbenchError(f"the peaks of this machine are unknown ({bw.note}); name a datasheet accelerator "
                            f"with --hardware")
    memory = hw.host_memory_bytes if hw.compute_device == "cpu" else sum(
        d.memory_bytes or 0 for d in hw.devices if d.kind != "cpu")
    return Machine(f"here: {hw.label()}", float(bw.value), float(peak.value), memory / 1e9, None,
                   "no price: pass --price-usd-per-hour", f"{bw.source} ({dtype})")
