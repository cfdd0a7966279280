"""What torch_moe runs: one :class:`MoEConfig` read strictly from a config.json of a known MoE family.

Every field that changes the computation is either implemented (read here, :data:`COMMON` or the family's
:data:`FAMILY_FIELDS`) or refused with its name; fields that only describe training, parallelism or metadata
are in :data:`COMMON` too. A config with a field in neither set is refused, so a model torch_moe
half-understands never produces plausible numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from capbench_core.errors import CapbenchError

#: Fields every family reads (shapes, RoPE, norms, windows) or that never change an eval-mode forward pass
#: (metadata, training losses and dropouts, parallelism hints).
COMMON = frozenset({
    "_name_or_path", "architectures", "auto_map", "transformers_version", "torch_dtype", "dtype", "model_type",
    "use_cache", "initializer_range", "bos_token_id", "pad_token_id", "eos_token_id", "output_router_logits",
    "router_aux_loss_coef", "router_z_loss_coef", "aux_loss_alpha", "seq_aux", "attention_dropout",
    "hidden_dropout", "embd_pdrop", "resid_pdrop", "ep_size", "initial_context_length", "return_dict",
    "output_hidden_states", "output_attentions", "id2label", "label2id", "problem_type", "is_encoder_decoder",
    "is_decoder", "chunk_size_feed_forward", "tokenizer_class", "task_specific_params", "torchscript",
    "use_bfloat16", "pruned_heads", "tie_encoder_decoder", "finetuning_task", "prefix", "sep_token_id",
    "decoder_start_token_id", "add_cross_attention", "cross_attention_hidden_size", "tf_legacy_loss",
    "use_return_dict", "max_window_layers", "use_sliding_window", "experts_per_token", "num_experts",
    "num_local_experts", "n_routed_experts", "rope_parameters", "rope_theta", "rope_scaling",
    "original_max_position_embeddings", "input_jitter_noise", "max_position_embeddings", "vocab_size",
    "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "num_experts_per_tok", "rms_norm_eps", "tie_word_embeddings", "hidden_act", "pretraining_tp",
    "quantization_config", "intermediate_size", "layer_types", "sliding_window",
    "qk_head_dim",  # DeepSeek: qk_nope_head_dim + qk_rope_head_dim, written by transformers 5
})

#: Per family, the fields read beyond the common ones above.
FAMILY_FIELDS: dict[str, frozenset[str]] = {
    "qwen3_moe": frozenset({"attention_bias", "decoder_sparse_step", "mlp_only_layers", "moe_intermediate_size",
                            "norm_topk_prob"}),
    "qwen2_moe": frozenset({"qkv_bias", "decoder_sparse_step", "mlp_only_layers", "moe_intermediate_size",
                            "norm_topk_prob", "shared_expert_intermediate_size"}),
    "mixtral": frozenset({"router_jitter_noise"}),
    "olmoe": frozenset({"attention_bias", "clip_qkv", "norm_topk_prob"}),
    "deepseek_v2": frozenset({"attention_bias", "mlp_bias", "first_k_dense_replace", "moe_layer_freq",
                              "kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                              "n_shared_experts", "moe_intermediate_size", "routed_scaling_factor", "topk_method",
                              "n_group", "topk_group", "norm_topk_prob", "scoring_func"}),
    "gpt_oss": frozenset({"attention_bias", "swiglu_limit", "swiglu_alpha"}),
    "phimoe": frozenset({"attention_bias", "lm_head_bias", "router_jitter_noise"}),
}
FAMILY_FIELDS["deepseek_v3"] = FAMILY_FIELDS["deepseek_v2"] | {"num_nextn_predict_layers", "rope_interleave"}
FAMILIES = tuple(FAMILY_FIELDS)
ROPE_TYPES = ("default", "linear", "yarn", "llama3", "longrope")


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding: which dims rotate, at what frequencies, and how the pairs are laid out."""

    dim: int
    theta: float
    kind: str = "default"
    params: tuple[tuple[str, Any], ...] = ()
    #: DeepSeek's MLA rotates interleaved pairs (x0, x1), (x2, x3), ...; everyone else rotates halves
    interleaved: bool = False
    max_position_embeddings: int = 4096

    def param(self, name: str, default: Any = None) -> Any:
        return dict(self.params).get(name, default)


@dataclass(frozen=True)
class MLASpec:
    """DeepSeek's multi-head latent attention: the cache holds the compressed latent and the rotary key."""

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int


RouterKind = Literal["softmax_topk", "topk_softmax", "deepseek_v2", "deepseek_v3", "sparsemixer"]


@dataclass(frozen=True)
class RouterSpec:
    kind: RouterKind
    norm_topk_prob: bool = False
    scaling: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    #: deepseek_v2: "greedy" or "group_limited_greedy"
    method: str = "greedy"
    bias: bool = False
    jitter_eps: float = 0.0
    #: routers that transformers keeps in float32 whatever the model dtype
    float32: bool = False


@dataclass(frozen=True)
class MoEConfig:
    """The architecture torch_moe builds, read from an HF config.json by :meth:`from_hf`."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    norm_topk_prob: bool
    rms_norm_eps: float
    rope_theta: float
    qk_norm: bool
    tie_word_embeddings: bool
    max_position_embeddings: int
    eos_token_id: int | None = None
    rope: RopeSpec | None = None
    router: RouterSpec = RouterSpec("softmax_topk")
    #: "rms" (weight * norm(x).to(dtype)), "rms_after" (gpt-oss: (weight * norm(x)).to(dtype)) or "layer"
    norm: str = "rms"
    #: "head" (Qwen3: per head), "full" (OLMoE: over the whole q / k projection) or None
    qk_norm_kind: str | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    clip_qkv: float | None = None
    sinks: bool = False
    #: per layer: sliding window length (keys with q_pos - k_pos < window) or None for full attention
    windows: tuple[int | None, ...] = ()
    mla: MLASpec | None = None
    #: per layer: True where the MLP is the routed MoE, False where it is a dense MLP of intermediate_size
    moe_layers: tuple[bool, ...] = ()
    intermediate_size: int = 0
    mlp_bias: bool = False
    #: "silu" (SwiGLU) or "gpt_oss" (clamped SwiGLU with alpha and limit)
    expert_act: str = "silu"
    expert_bias: bool = False
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    shared_intermediate_size: int = 0
    shared_gate: bool = False
    lm_head_bias: bool = False
    #: trailing checkpoint layers that are not part of the decoder (DeepSeek-V3's multi-token prediction)
    extra_layers: int = 0
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def num_moe_layers(self) -> int:
        return sum(self.moe_layers)

    @property
    def attention_scale(self) -> float:
        qk = self.mla.qk_nope_head_dim + self.mla.qk_rope_head_dim if self.mla else self.head_dim
        scale = qk ** -0.5
        if self.mla and self.rope and self.rope.kind != "default" and self.rope.param("mscale_all_dim"):
            mscale = yarn_mscale(float(self.rope.param("factor")), float(self.rope.param("mscale_all_dim")))
            scale *= mscale * mscale
        return scale

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> MoEConfig:
        """Read ``cfg`` (a normalised config.json) strictly; unknown or unimplemented fields are errors."""
        model_type = str(cfg.get("model_type", ""))
        if model_type not in FAMILY_FIELDS:
            raise CapbenchError(f"torch_moe cannot run model_type '{model_type}': it runs "
                                f"{', '.join(FAMILIES)}")
        unknown = sorted(set(cfg) - COMMON - FAMILY_FIELDS[model_type])
        if unknown:
            raise CapbenchError(f"torch_moe does not implement config field(s) {', '.join(unknown)} of this "
                                f"{model_type} checkpoint; they may change the computation, so it refuses to run "
                                f"it rather than produce different numbers")
        return _Reader(model_type, cfg).config()


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


class _Reader:
    """Turns one family's config fields into MoEConfig arguments, refusing values it cannot honour."""

    def __init__(self, model_type: str, cfg: Mapping[str, Any]):
        self.t = model_type
        self.cfg = cfg

    def get(self, key: str, default: Any = None) -> Any:
        value = self.cfg.get(key)
        return default if value is None else value

    def refuse(self, what: str) -> CapbenchError:
        return CapbenchError(f"torch_moe cannot run this {self.t} checkpoint: {what}")

    def config(self) -> MoEConfig:
        t, get = self.t, self.get
        layers = int(self.cfg["num_hidden_layers"])
        heads = int(self.cfg["num_attention_heads"])
        hidden = int(self.cfg["hidden_size"])
        head_dim = int(get("head_dim") or hidden // heads)
        if t not in ("gpt_oss",) and get("hidden_act", "silu") != "silu":
            raise self.refuse(f"hidden_act '{get('hidden_act')}' (only silu is implemented)")
        if int(get("pretraining_tp", 1)) != 1:
            raise self.refuse("pretraining_tp != 1")
        self._quantization()
        eos = get("eos_token_id")
        mla = self._mla()
        rope_dim = mla.qk_rope_head_dim if mla else head_dim
        experts = int(self.cfg[{"mixtral": "num_local_experts", "phimoe": "num_local_experts",
                                "gpt_oss": "num_local_experts", "deepseek_v2": "n_routed_experts",
                                "deepseek_v3": "n_routed_experts"}.get(t, "num_experts")])
        intermediate = int(get("intermediate_size", 0))
        expert_size = int(get("moe_intermediate_size") or intermediate)
        return MoEConfig(
            model_type=t, vocab_size=int(self.cfg["vocab_size"]), hidden_size=hidden, num_layers=layers,
            num_heads=heads, num_kv_heads=int(get("num_key_value_heads") or heads), head_dim=head_dim,
            num_experts=experts, top_k=int(self.cfg["num_experts_per_tok"]), moe_intermediate_size=expert_size,
            norm_topk_prob=bool(get("norm_topk_prob", t in ("mixtral",))),
            rms_norm_eps=float(get("rms_norm_eps", 1e-6)), rope_theta=float(get("rope_theta", 10000.0)),
            qk_norm=t in ("qwen3_moe", "olmoe"), tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            max_position_embeddings=int(get("max_position_embeddings", 4096)),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
            rope=self._rope(rope_dim, interleaved=bool(mla) and (t == "deepseek_v2" or
                                                                 bool(get("rope_interleave", True)))),
            router=self._router(experts),
            norm={"phimoe": "layer", "gpt_oss": "rms_after"}.get(t, "rms"),
            qk_norm_kind={"qwen3_moe": "head", "olmoe": "full"}.get(t),
            qkv_bias=bool(get("qkv_bias", True)) if t == "qwen2_moe" else bool(get("attention_bias", False)),
            o_bias=t != "qwen2_moe" and bool(get("attention_bias", False)),
            clip_qkv=float(get("clip_qkv")) if get("clip_qkv") is not None else None,
            sinks=t == "gpt_oss",
            windows=self._windows(layers),
            mla=mla,
            moe_layers=self._moe_layers(layers),
            intermediate_size=intermediate,
            mlp_bias=bool(get("mlp_bias", False)),
            expert_act="gpt_oss" if t == "gpt_oss" else "silu",
            expert_bias=t == "gpt_oss",
            swiglu_alpha=float(get("swiglu_alpha", 1.702)),
            swiglu_limit=float(get("swiglu_limit", 7.0)),
            shared_intermediate_size=self._shared(expert_size),
            shared_gate=t == "qwen2_moe" and bool(get("shared_expert_intermediate_size")),
            lm_head_bias=bool(get("lm_head_bias", False)),
            extra_layers=int(get("num_nextn_predict_layers", 0)),
        )

    def _quantization(self) -> None:
        quant = self.cfg.get("quantization_config")
        if not quant:
            return
        method = quant.get("quant_method") if isinstance(quant, Mapping) else None
        if not (self.t == "gpt_oss" and method == "mxfp4"):
            raise self.refuse(f"its weights are quantized ({method}); torch_moe loads bf16/fp16/fp32 weights "
                              f"and gpt-oss's MXFP4 experts (serve quantized checkpoints with vllm or sglang)")

    def _mla(self) -> MLASpec | None:
        if not self.t.startswith("deepseek"):
            return None
        get = self.get
        return MLASpec(q_lora_rank=int(get("q_lora_rank")) if get("q_lora_rank") else None,
                       kv_lora_rank=int(self.cfg["kv_lora_rank"]), qk_nope_head_dim=int(self.cfg["qk_nope_head_dim"]),
                       qk_rope_head_dim=int(self.cfg["qk_rope_head_dim"]), v_head_dim=int(self.cfg["v_head_dim"]))

    def _rope(self, dim: int, interleaved: bool) -> RopeSpec:
        scaling = dict(self.get("rope_scaling", {}) or {})
        kind = str(scaling.pop("rope_type", None) or scaling.pop("type", None) or "default")
        scaling.pop("type", None)
        if kind not in ROPE_TYPES:
            raise self.refuse(f"rope_scaling type '{kind}' (implemented: {', '.join(ROPE_TYPES)})")
        if float(scaling.pop("partial_rotary_factor", 1.0)) != 1.0:
            raise self.refuse("partial_rotary_factor != 1 (partial RoPE)")
        if kind in ("yarn", "longrope", "llama3"):
            scaling.setdefault("original_max_position_embeddings",
                               self.get("original_max_position_embeddings") or self.get("max_position_embeddings"))
        return RopeSpec(dim=dim, theta=float(self.get("rope_theta", 10000.0)), kind=kind,
                        params=tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in scaling.items())),
                        interleaved=interleaved, max_position_embeddings=int(self.get("max_position_embeddings", 4096)))

    def _router(self, experts: int) -> RouterSpec:
        t, get = self.t, self.get
        if t == "gpt_oss":
            return RouterSpec("topk_softmax", bias=True)
        if t == "phimoe":
            if int(self.cfg["num_experts_per_tok"]) != 2:
                raise self.refuse("sparsemixer routing is defined for top-2 only")
            return RouterSpec("sparsemixer", jitter_eps=float(get("router_jitter_noise", 0.01)))
        if t in ("deepseek_v2", "deepseek_v3"):
            return self._deepseek_router(experts)
        return RouterSpec("softmax_topk", norm_topk_prob=bool(get("norm_topk_prob", t == "mixtral")))

    def _deepseek_router(self, experts: int) -> RouterSpec:
        get = self.get
        groups, topk_groups = int(get("n_group", 1)), int(get("topk_group", 1))
        if experts % groups:
            raise self.refuse(f"n_group {groups} does not divide the {experts} routed experts")
        if self.t == "deepseek_v2":
            method = str(get("topk_method", "greedy"))
            if method not in ("greedy", "group_limited_greedy") or get("scoring_func", "softmax") != "softmax":
                raise self.refuse(f"topk_method '{method}' with scoring_func '{get('scoring_func')}' (DeepSeek-V2 "
                                  f"routing is softmax with greedy or group_limited_greedy)")
            if get("norm_topk_prob", False):
                raise self.refuse("norm_topk_prob=true: DeepSeek-V2's reference code and transformers disagree on "
                                  "it, so no exact result can be promised")
            return RouterSpec("deepseek_v2", scaling=float(get("routed_scaling_factor", 1.0)), n_group=groups,
                              topk_group=topk_groups, method=method, float32=True)
        if get("topk_method", "noaux_tc") != "noaux_tc" or get("scoring_func", "sigmoid") != "sigmoid":
            raise self.refuse(f"topk_method '{get('topk_method')}' with scoring_func '{get('scoring_func')}' "
                              f"(DeepSeek-V3 routing is sigmoid noaux_tc)")
        return RouterSpec("deepseek_v3", norm_topk_prob=bool(get("norm_topk_prob", True)),
                          scaling=float(get("routed_scaling_factor", 1.0)), n_group=groups, topk_group=topk_groups,
                          float32=True)

    def _windows(self, layers: int) -> tuple[int | None, ...]:
        get = self.get
        window = get("sliding_window")
        if self.t in ("qwen2_moe", "qwen3_moe"):
            if not get("use_sliding_window", False):
                return (None,) * layers
            # transformers' Qwen2-MoE slides on odd layers below max_window_layers, its Qwen3-MoE on all layers
            types = get("layer_types") or ["sliding_attention" if self.t == "qwen3_moe" or (i + 1) % 2 and i < int(
                get("max_window_layers", 28)) else "full_attention" for i in range(layers)]
        elif self.t == "gpt_oss":
            types = get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention"
                                           for i in range(layers)]
        elif self.t in ("mixtral", "phimoe"):
            types = ["sliding_attention"] * layers
        else:
            if window:
                raise self.refuse(f"sliding_window {window} (transformers' {self.t} attends over the full context)")
            return (None,) * layers
        if len(types) != layers:
            raise self.refuse(f"layer_types names {len(types)} layers, num_hidden_layers is {layers}")
        return tuple(int(window) if kind == "sliding_attention" and window else None for kind in types)

    def _moe_layers(self, layers: int) -> tuple[bool, ...]:
        get = self.get
        if self.t in ("qwen2_moe", "qwen3_moe"):
            step, dense = int(get("decoder_sparse_step", 1)), set(get("mlp_only_layers", []) or [])
            return tuple(i not in dense and (i + 1) % step == 0 for i in range(layers))
        if self.t.startswith("deepseek"):
            first, freq = int(get("first_k_dense_replace", 0)), int(get("moe_layer_freq", 1))
            return tuple(i >= first and i % freq == 0 for i in range(layers))
        return (True,) * layers

    def _shared(self, expert_size: int) -> int:
        if self.t == "qwen2_moe":
            return int(self.get("shared_expert_intermediate_size", 0))
        if self.t.startswith("deepseek"):
            return expert_size * int(self.get("n_shared_experts", 0) or 0)
        return 0
