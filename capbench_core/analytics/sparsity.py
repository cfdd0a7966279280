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

from capbench_core.analytics import losslaw
from capbench_core.analytics.losslaw import LossFit
from capbench_core.analytics.metrics import decode_step_cost, pareto_front
from capbench_core.analytics.model_spec import ModelSpec, spec_from_config
from capbench_core.contract.backend import DecodeStep
from capbench_core.errors import CapbenchError

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


def expected_distinct_experts(num_experts: int, top_k: int, batch: float) -> float:
    """E(1 - (1 - k/E)^B): distinct experts one MoE layer reads when B tokens route uniformly."""
    return float(num_experts * (1 - (1 - top_k / num_experts) ** batch))


def family_configs(active_params: float, experts: list[int], top_k: int,
                   base: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Configs with ~``active_params`` active parameters per token and E experts each (E = 1: dense)."""
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
    configs = []
    for e in experts:
        k, inter_e = (1, inter * top_k) if e == 1 else (top_k, inter)
        configs.append({**shape, "num_experts": e, "num_experts_per_tok": k, "moe_intermediate_size": inter_e,
                        "intermediate_size": inter_e})
    return configs


def mirror_configs(total_params: float, experts: int, top_ks: list[int],
                   base: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The mirror family: ~``total_params`` in every member (E experts of one width), top-k varying, so
    active parameters and FLOPs per token grow with k while the weights to hold stay the same."""
    shape = {**BASE_SHAPE, **(base or {})}
    bad = [k for k in top_ks if k > experts]
    if bad:
        raise CapbenchError(f"top-k {bad[0]} is larger than {experts} experts: use --top-k values <= {experts}")

    def total_at(inter: int) -> int:
        config = {**shape, "num_experts": experts, "num_experts_per_tok": 1, "moe_intermediate_size": inter,
                  "intermediate_size": inter}
        return spec_from_config(config, "probe").total_params

    per_unit = total_at(2) - total_at(1)
    fixed = total_at(1) - per_unit
    width = (total_params - fixed) / per_unit
    if width < 1:
        raise CapbenchError(f"a total budget of {total_params:.3g} parameters is smaller than attention, norms "
                            f"and embeddings alone ({fixed:.3g}) in this layout; raise --total-params")
    inter = max(1, round(width))
    return [{**shape, "num_experts": experts, "num_experts_per_tok": k, "moe_intermediate_size": inter,
             "intermediate_size": inter} for k in top_ks]


def member_name(config: dict[str, Any]) -> str:
    return f"E{config['num_experts']}-k{config['num_experts_per_tok']}"


def family(active_params: float, experts: list[int], top_k: int,
           base: dict[str, Any] | None = None) -> list[ModelSpec]:
    return [spec_from_config(c, member_name(c)) for c in family_configs(active_params, experts, top_k, base)]


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
    from capbench_core.analytics.cost import rows_for
    from capbench_core.analytics.datasheets import datasheet
    from capbench_core.errors import find_name

    rows = {str(r["name"]): r for r in datasheet()}
    row = rows[find_name("hardware", name, list(rows))]
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


def predict_step_ms(spec: ModelSpec, machine: Machine, batch: float, context_tokens: float, dtype: str) -> float:
    """Roofline step time at a (possibly fractional) mean batch, uniform-routing experts."""
    a = expected_distinct_experts(spec.num_experts, spec.top_k, max(batch, 1.0)) if spec.is_moe else 0.0
    step = DecodeStep(batch_size=max(1, round(batch)), step_ns=0, context_tokens=round(batch * context_tokens),
                      distinct_experts=[a] * spec.moe_layers)
    cost = decode_step_cost(spec, step, dtype, dtype)
    return max(cost.bytes / (machine.mem_bw_gbps * 1e9), cost.flops / (machine.tflops * 1e12)) * 1e3


FIXED_SIZES = (1e8, 3e8, 1e9, 3e9, 1e10, 3e10, 1e11)


def joint(fit: LossFit, compute: float, experts: list[int], top_k: int, machine: Machine, batch: int, dtype: str,
          context: int) -> dict[str, Any]:
    """Both halves in one view: per sparsity, the compute-optimal model at ``compute`` training FLOPs
    (Eq. 6 with ``fit``) and what serving it costs on ``machine`` at decode batch ``batch`` (roofline)."""
    optima = [losslaw.compute_optimal(fit, compute, e, top_k) for e in experts]
    specs = [p.spec() for p in optima]
    rows = analyse(specs, machine, [batch], dtype, context)
    members: list[dict[str, Any]] = []
    for p, spec, row in zip(optima, specs, rows):
        v = row.by_batch[batch]
        # A member that does not fit one accelerator gets no serving figures: the roofline is for one device.
        serving_note = None if row.fits else (f"does not fit one {machine.name} ({row.weight_gb:.1f} GB of weights "
                                              f"> {machine.memory_gb:g} GB); serving across several is not modelled")
        members.append({"name": f"E{p.experts}-k{p.top_k}", "experts": p.experts, "top_k": p.top_k,
                        "sparsity": p.sparsity, "hidden": p.hidden, "layers": spec.num_layers,
                        "predicted_loss": p.loss, "total_params": p.total_params, "active_params": p.active_params,
                        "training_tokens": p.tokens, "weight_bytes": spec.weight_bytes(dtype),
                        "fits_memory": row.fits, "tok_per_s": v["tok_per_s"] if row.fits else None,
                        "cost_usd_per_mtok": v["usd_per_mtok"] if row.fits else None, "serving_note": serving_note,
                        "bound": v["bound"], "extrapolated": list(p.extrapolated)})
    servable = [m for m in members if m["fits_memory"]]
    front = pareto_front([(m["predicted_loss"], float(m["tok_per_s"])) for m in servable])  # lower loss vs cheaper
    for m in members:
        m["pareto"] = False
    for m, on in zip(servable, front):
        m["pareto"] = on
    fixed = [losslaw.best_sparsity_at_size(fit, compute, n, experts, top_k) for n in FIXED_SIZES]
    return {"compute_budget_flops": compute, "batch": batch, "top_k": top_k, **fit.provenance(),
            "layout": "qwen3_moe layout grown in width and depth together (losslaw.scaled_config): hidden h, h/128 "
                      "layers, 64-dim heads, GPT-NeoX vocabulary 50304, active FFN 4h split over the k experts",
            "members": members,
            "fixed_size": [{"total_params": n, "best_sparsity": p.sparsity, "best_experts": p.experts,
                            "predicted_loss": p.loss} for n, p in zip(FIXED_SIZES, fixed)],
            "dense_best_below_params": losslaw.dense_best_below(fit, compute, experts, top_k)}
