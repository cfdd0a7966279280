"""S-MBU and S-MFU the way MoE-CAP computes them, to set stored runs beside MoE-CAP's leaderboard.

Read from Auto-CAP/MoE-CAP (2026-12): ``moe_cap/utils/continuous_batching_utils.py``
(``_calculate_continuous_metrics``), ``basic_utils.py`` (``_calculate_kv_size``,
``_calculate_attention_size``, ``_calculate_attention_score``, ``_process_outputs_continuous``,
``_calculate_default_decoding``), ``qwen_utils.py`` (``_calculate_qwen_decoding``,
``_calculate_qwen3_decoding``, ``_get_qwen3_expert_config``), ``deepseek_utils.py``
(``_calculate_deepseek_decoding``, ``_calculate_deepseek_attention_size``,
``_get_deepseek_expert_config``), ``hardware_utils.py`` (``MEM_BW_DICT``, ``PEAK_FLOPS_DICT``) and
``model_loader/hf_model_info_loader.py`` (``ffn_dim``, precision bytes). docs/metrics.md lists
where this differs from capbench's own definitions and which is right.

Per decode pass (here: per stored decode step) with batch B, latency t, summed context C and A the
mean over layers of the distinct experts activated:

* bytes  = (L_moe x A x expert + L_dense x dense_ffn + L x attn + C x kv_per_token) x bytes_per_param
* FLOPs  = (L_moe x expert + L_dense x dense_ffn + L x attn + attention_score(C)) x 2 x B / t  (per second)
* S-MBU  = bytes / t / (gpus x peak bandwidth);  S-MFU = FLOPs/s / (gpus x peak FLOPs / 2)

and the run's figure is the plain mean over passes. ``expert`` is one expert's weights (3 x d_ff x d_model),
``attn`` the q/k/v/o weights; embeddings, LM head, router and norms are not counted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from capbench_core.analytics.grouping import run_load
from capbench_core.analytics.metrics import stored_steps
from capbench_core.contract.backend import DecodeStep
from capbench_core.contract.records import RunResult

# MoE-CAP's hardware_utils tables, for the devices capbench's datasheet also has: (bytes/s, FLOP/s by
# dtype). Its FLOP/s are the sparse (2:4) figures for these devices, which its S-MFU halves.
MOE_CAP_PEAKS: dict[str, tuple[float, dict[str, float]]] = {
    "H100 SXM": (3350e9, {"float32": 989e12, "float16": 1979e12, "bfloat16": 1979e12, "fp8": 3958e12}),
    "H100 PCIe": (2039e9, {"float32": 756e12, "float16": 1513e12, "bfloat16": 1513e12, "fp8": 3026e12}),
    "H200 SXM": (4800e9, {"float32": 989e12, "float16": 1979e12, "bfloat16": 1979e12, "fp8": 3958e12}),
    "A100 SXM 80GB": (2039e9, {"float32": 312e12, "float16": 624e12, "bfloat16": 624e12, "int8": 1248e12}),
    "A100 PCIe 80GB": (1935e9, {"float32": 312e12, "float16": 624e12, "bfloat16": 624e12, "int8": 1248e12}),
    "A100 SXM 40GB": (1555e9, {"float32": 312e12, "float16": 624e12, "bfloat16": 624e12, "int8": 1248e12}),
}
PRECISION_BYTES = {"float32": 4.0, "float16": 2.0, "bfloat16": 2.0, "int8": 1.0, "fp8": 1.0, "int4": 0.5,
                   "fp4": 0.5}


@dataclass(frozen=True)
class Peaks:
    """What MoE-CAP divides by: total bandwidth (bytes/s) and FLOP/s (already halved where MoE-CAP halves)."""

    bw: float
    flops: float
    note: str


@dataclass(frozen=True)
class Shape:
    """The config numbers MoE-CAP's formulas use, by its own reading of config.json."""

    family: str          # default | qwen | qwen3 | deepseek
    layers: int
    moe_layers: int
    dense_layers: int
    attn: float          # attention weights per layer
    expert: float        # one expert's weights
    dense_ffn: float     # a dense layer's FFN weights (qwen3, deepseek)
    shared: float        # shared experts per MoE layer (qwen, deepseek)
    kv_per_token: float  # cached elements per token, all layers
    score_k: float       # attention-score factors per context token, all layers
    score_v: float


def family(config: Mapping[str, Any]) -> str:
    """MoE-CAP picks its formula by model name ("Qwen3", "Qwen", "DeepSeek"); capbench by architecture."""
    return {"qwen3_moe": "qwen3", "qwen2_moe": "qwen", "deepseek_v2": "deepseek",
            "deepseek_v3": "deepseek"}.get(str(config.get("model_type")), "default")


def shape(config: Mapping[str, Any]) -> Shape:
    fam = family(config)
    layers, d = int(config["num_hidden_layers"]), int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    d_head = int(config.get("head_dim") or d // heads)
    d_ff = int(config.get("moe_intermediate_size") or config.get("intermediate_size") or 0)
    expert, dense_ffn, shared = 3.0 * d_ff * d, 0.0, 0.0
    moe_layers, dense_layers = layers, 0
    attn = d * (heads * d_head + kv_heads * d_head * 2) + heads * d_head * d
    kv = 2.0 * layers * d_head * kv_heads
    score_k = score_v = float(layers * heads * d_head)
    if fam == "qwen":
        shared = 3.0 * int(config.get("shared_expert_intermediate_size") or 0) * d
    elif fam == "qwen3":
        dense_only = set(config.get("mlp_only_layers") or [])
        step = int(config.get("decoder_sparse_step") or 1)
        moe_layers = sum(1 for i in range(layers) if i not in dense_only and (i + 1) % step == 0)
        dense_layers = layers - moe_layers
        dense_ffn = 3.0 * int(config["intermediate_size"]) * d
    elif fam == "deepseek":
        rank, rope = int(config["kv_lora_rank"]), int(config["qk_rope_head_dim"])
        nope, v = int(config["qk_nope_head_dim"]), int(config["v_head_dim"])
        q_dim = rope + nope
        attn = d * (rank + rope) + rank * heads * (q_dim - rope + v) + v * heads * d
        q_lora = int(config.get("q_lora_rank") or 0)
        attn += d * q_lora + q_lora * heads * q_dim if q_lora else d * heads * q_dim
        dense_layers = int(config["first_k_dense_replace"])
        moe_layers = layers - dense_layers
        shared = expert * 2  # MoE-CAP counts two shared experts whatever n_shared_experts says
        dense_ffn = 3.0 * int(config["intermediate_size"]) * d
        kv = float(layers * (rank + rope))
        score_k, score_v = float(layers * heads * q_dim), float(layers * heads * v)
    return Shape(fam, layers, moe_layers, dense_layers, float(attn), expert, dense_ffn, shared, kv, score_k,
                 score_v)


def attention_score(s: Shape, context: float) -> float:
    """``_calculate_attention_score`` for one decode token (output_len = 1) at summed context C."""
    if s.family == "deepseek":
        return context * s.score_k + context * s.score_v
    return context * s.score_k * 2


def step_efficiency(s: Shape, step: DecodeStep, precision: float, peaks: Peaks) -> tuple[float, float]:
    """(S-MBU, S-MFU) of one decode pass, as MoE-CAP's decoding calculators compute them."""
    tpot = step.step_ns / 1e9
    activation = sum(step.distinct_experts) / len(step.distinct_experts) if step.distinct_experts else 0.0
    kv = step.context_tokens * s.kv_per_token
    if s.family == "qwen3":
        weights = s.moe_layers * activation * s.expert + s.dense_layers * s.dense_ffn + s.layers * s.attn
        flop_weights = s.moe_layers * s.expert + s.dense_layers * s.dense_ffn + s.layers * s.attn
    elif s.family == "deepseek":
        weights = (s.layers * s.attn + s.moe_layers * (activation * s.expert + s.shared)
                   + s.dense_layers * s.dense_ffn)
        flop_weights = s.layers * s.attn + s.moe_layers * (s.expert + s.shared) + s.dense_layers * s.dense_ffn
    else:  # default and qwen (shared is 0 for default)
        weights = s.layers * (activation * s.expert + s.shared + s.attn)
        flop_weights = s.layers * (s.attn + s.expert + s.shared)
    smbu = (weights + kv) * precision / tpot / peaks.bw
    smfu = (flop_weights + attention_score(s, step.context_tokens)) * 2 * (step.batch_size / tpot) / peaks.flops
    return smbu, smfu


def peaks_for(hardware: Any, dtype: str, on_accelerator: bool, bw_gbps: float | None,
              tflops: float | None) -> Peaks | None:
    """MoE-CAP's own table for an accelerator it lists (FLOP/s halved, as its code does); otherwise the
    peaks capbench used for the run (``bw_gbps``, ``tflops``), not halved: MoE-CAP has no entry there."""
    from capbench_core.analytics.datasheets import match_accelerator

    accel = [d for d in hardware.devices if d.kind != "cpu"]
    if accel and on_accelerator:
        row = match_accelerator(accel[0].model)
        count = sum(d.count for d in accel)
        if row and row["name"] in MOE_CAP_PEAKS and dtype in MOE_CAP_PEAKS[row["name"]][1]:
            bw, flops = MOE_CAP_PEAKS[row["name"]]
            return Peaks(bw * count, flops[dtype] * count / 2,
                         f"MoE-CAP's table for {row['name']} x{count} (its FLOP/s halved, as its code does)")
    if not bw_gbps or not tflops:
        return None
    return Peaks(bw_gbps * 1e9, tflops * 1e12, "MoE-CAP has no peaks for this device: capbench's, not halved")


def run_efficiency(config: Mapping[str, Any], steps: Sequence[DecodeStep], dtype: str,
                   peaks: Peaks) -> tuple[float | None, float | None]:
    """The run's MoE-CAP S-MBU and S-MFU: plain means over its decode passes."""
    timed = [st for st in steps if st.step_ns > 0]
    if not timed:
        return None, None
    s = shape(config)
    pairs = [step_efficiency(s, st, PRECISION_BYTES.get(dtype, 2.0), peaks) for st in timed]
    return sum(p[0] for p in pairs) / len(pairs), sum(p[1] for p in pairs) / len(pairs)


def compare_row(r: RunResult) -> dict[str, Any]:
    """capbench's S-MBU/S-MFU beside MoE-CAP's, recomputed from the run's stored decode steps."""
    row: dict[str, Any] = {"run_id": r.run_id, "backend": r.backend, "load": run_load(r), "s_mbu": r.metrics.s_mbu,
                           "s_mfu": r.metrics.s_mfu, "moe_cap_s_mbu": None, "moe_cap_s_mfu": None, "note": "",
                           "s_mbu_single": r.metrics.s_mbu_single}
    if r.decode_steps is None or r.model.config is None:
        row["note"] = "the run stored no decode steps or model config (recorded before capbench kept them)"
        return row
    hw = r.hardware
    on_accelerator = hw.compute_device != "cpu" and r.metrics.peak_mem_bw_gbps == hw.peak_mem_bw_gbps.value
    peaks = peaks_for(r.hardware, r.decode_steps.dtype, on_accelerator, r.metrics.peak_mem_bw_gbps,
                             r.metrics.peak_flops_tflops)
    if peaks is None:
        row["note"] = f"no peak bandwidth or {r.decode_steps.dtype} FLOP/s is known for this hardware"
        return row
    row["moe_cap_s_mbu"], row["moe_cap_s_mfu"] = run_efficiency(
        r.model.config, stored_steps(r.decode_steps), r.decode_steps.dtype, peaks)
    row["note"] = f"{family(r.model.config)} formula; {peaks.note}"
    return row
