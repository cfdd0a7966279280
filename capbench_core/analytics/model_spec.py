"""Architecture analytics: parameters, FLOPs and bytes of an MoE model.

Every supported ``model_type`` is first normalised into an :class:`ArchShape`
(the few numbers that decide counts); one routine then counts parameters per
component. Conventions (see docs/metrics.md):

* ``total_params`` counts every weight, with the input embedding table and the
  LM head (once if tied). Multi-token-prediction heads (DeepSeek-V3
  ``num_nextn_predict_layers``) are not counted: they are not used in serving.
* ``active_params`` counts what one token touches: all non-expert weights,
  shared experts, top-k routed experts, router and LM head, and the input
  embedding table (the Mixtral/Qwen convention). ``active_params_no_embed``
  leaves the input embedding table out (the DeepSeek/gpt-oss convention); for
  tied embeddings the table stays, because it is also the LM head.
* ``sparsity = 1 - top_k / num_experts`` (share of inactive routed experts).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from capbench_core.analytics.checkpoint import normalize, read_config
from capbench_core.analytics.weights import DTYPE_BYTES
from capbench_core.errors import CapbenchError


@dataclass(frozen=True)
class AttnShape:
    """Attention weights of one layer: GQA (``kind='gqa'``) or DeepSeek MLA (``'mla'``)."""

    kind: str
    num_heads: int
    num_kv_heads: int = 0
    head_dim: int = 0
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: int = 0            # parameters of q/k norms per layer
    sinks: bool = False         # gpt-oss learned attention sinks (one per head)
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0

    def params(self, hidden: int) -> int:
        if self.kind == "mla":
            q_dim = self.num_heads * (self.qk_nope_head_dim + self.qk_rope_head_dim)
            q = (hidden * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * q_dim
                 if self.q_lora_rank else hidden * q_dim)
            kv = (hidden * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
                  + self.kv_lora_rank * self.num_heads * (self.qk_nope_head_dim + self.v_head_dim))
            return q + kv + self.num_heads * self.v_head_dim * hidden
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        weights = hidden * (q + 2 * kv) + q * hidden
        biases = (q + 2 * kv if self.qkv_bias else 0) + (hidden if self.o_bias else 0)
        return weights + biases + self.qk_norm + (self.num_heads if self.sinks else 0)

    def score_value_dims(self) -> tuple[int, int]:
        """(q·k dim, value dim) summed over heads, for attention FLOPs."""
        if self.kind == "mla":
            return (self.num_heads * (self.qk_nope_head_dim + self.qk_rope_head_dim),
                    self.num_heads * self.v_head_dim)
        return self.num_heads * self.head_dim, self.num_heads * self.head_dim

    def kv_elements_per_token(self) -> int:
        """Cached elements per token per layer (MLA caches the latent plus RoPE key)."""
        if self.kind == "mla":
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.num_kv_heads * self.head_dim


@dataclass(frozen=True)
class ArchShape:
    """The numbers that decide an architecture's counts."""

    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    tied_embeddings: bool
    attn: AttnShape
    norm_params_per_layer: int
    final_norm_params: int
    dense_layers: int = 0
    dense_mlp_params: int = 0
    moe_layers: int = 0
    num_experts: int = 0
    top_k: int = 0
    expert_params: int = 0       # one routed expert
    shared_expert_params: int = 0  # all shared experts of one MoE layer (+ their gate)
    shared_experts: int = 0
    router_params: int = 0       # one MoE layer
    lm_head_bias: bool = False
    sliding_window: int = 0      # tokens a windowed layer keeps and attends to (0: no window)
    sliding_layers: int = 0      # how many layers use it


@dataclass(frozen=True)
class Component:
    total: int
    active: int


@dataclass
class ModelSpec:
    """What `capbench model inspect` prints, and what the metrics need."""

    name: str
    architecture: str
    num_layers: int
    moe_layers: int
    hidden_size: int
    vocab_size: int
    num_experts: int
    top_k: int
    shared_experts: int
    total_params: int
    active_params: int
    active_params_no_embed: int
    sparsity: float
    expert_params: int
    embedding_params: int
    lm_head_params: int
    kv_elements_per_token: int
    attn_score_dim: int
    attn_value_dim: int
    components: dict[str, Component] = field(default_factory=dict)
    sliding_window: int = 0
    sliding_layers: int = 0
    mla: dict[str, int] = field(default_factory=dict)  # DeepSeek MLA dims, for the absorbed FLOPs form

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 1

    def attended_tokens(self, context_len: float) -> float:
        """Cached tokens one new token attends to, summed over layers: a sliding-window layer keeps and
        reads at most its window, every other layer the whole context."""
        windowed = min(context_len, self.sliding_window) if self.sliding_window else context_len
        return (self.num_layers - self.sliding_layers) * context_len + self.sliding_layers * windowed

    def matmul_flops_per_token(self) -> float:
        """2 x the matmul weights one token multiplies: active params without the input embedding (a
        lookup), the LM head included (tied or not). Norm weights are elementwise and not counted."""
        return 2.0 * (self.active_params_no_embed - self.components.get("norms", Component(0, 0)).active)

    def flops_per_token(self, context_len: int) -> float:
        """Forward FLOPs for one token at ``context_len``: matmuls + attention (q.k and p.v against every
        attended cached token; sliding-window layers attend to at most their window)."""
        attention = 2 * (self.attn_score_dim + self.attn_value_dim) * self.attended_tokens(context_len)
        return self.matmul_flops_per_token() + attention

    def flops_per_token_mla_absorbed(self, context_len: int) -> float | None:
        """MLA only: FLOPs with the weight absorption decode kernels run (vLLM, SGLang): scores and values
        against the cached latent (kv_lora_rank + rope dims per head) instead of per-head keys and values.
        The matmul part is the same (the absorbed projections multiply the same weights)."""
        if not self.mla:
            return None
        heads, rank, rope = self.mla["num_heads"], self.mla["kv_lora_rank"], self.mla["qk_rope_head_dim"]
        attention = 2 * heads * ((rank + rope) + rank) * self.attended_tokens(context_len)
        return self.matmul_flops_per_token() + attention

    def kv_bytes_per_token(self, dtype: str = "bfloat16") -> float:
        """KV-cache bytes one token adds, over every layer (windowed layers drop it again later)."""
        return self.num_layers * self.kv_elements_per_token * DTYPE_BYTES[dtype]

    def kv_bytes_at_context(self, context_len: int, dtype: str = "bfloat16") -> float:
        """KV-cache bytes one sequence of ``context_len`` tokens holds: windowed layers keep at most the window."""
        return self.attended_tokens(context_len) * self.kv_elements_per_token * DTYPE_BYTES[dtype]

    def weight_bytes(self, dtype: str = "bfloat16") -> float:
        return self.total_params * DTYPE_BYTES[dtype]

    def expert_bytes(self, dtype: str = "bfloat16") -> float:
        """Bytes of one routed expert of one layer."""
        return self.expert_params * DTYPE_BYTES[dtype]

    def dense_read_params(self) -> int:
        """Weights every decode step reads whatever the routing: all but routed experts
        and the input embedding table (only B rows of it are read)."""
        routed_active = self.moe_layers * self.top_k * self.expert_params if self.is_moe else 0
        return self.active_params_no_embed - routed_active

    def summary(self, context_len: int = 1024, dtype: str = "bfloat16") -> dict[str, Any]:
        """The contract keys of `model inspect --json`, plus extras."""
        return {
            "name": self.name,
            "architecture": self.architecture,
            "total_params": self.total_params,
            "active_params": self.active_params,
            "active_params_no_embed": self.active_params_no_embed,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "shared_experts": self.shared_experts,
            "sparsity": self.sparsity,
            "num_layers": self.num_layers,
            "moe_layers": self.moe_layers,
            "flops_per_token": self.flops_per_token(context_len),
            "flops_context_len": context_len,
            "flops_per_token_mla_absorbed": self.flops_per_token_mla_absorbed(context_len),
            "kv_bytes_per_token": self.kv_bytes_per_token(dtype),
            "kv_bytes_at_context": self.kv_bytes_at_context(context_len, dtype),
            "sliding_window": self.sliding_window or None,
            "sliding_layers": self.sliding_layers,
            "kv_dtype": dtype,
            "weight_bytes": self.weight_bytes(dtype),
            "expert_bytes_per_layer": self.expert_bytes(dtype),
            "components": {k: asdict(v) for k, v in self.components.items()},
        }


def count(shape: ArchShape, name: str) -> ModelSpec:
    """Count parameters per component from a normalised shape."""
    h, v = shape.hidden_size, shape.vocab_size
    embed = v * h
    head = 0 if shape.tied_embeddings else v * h + (v if shape.lm_head_bias else 0)
    attn = shape.num_layers * shape.attn.params(h)
    norms = shape.num_layers * shape.norm_params_per_layer + shape.final_norm_params
    dense = shape.dense_layers * shape.dense_mlp_params
    routed_total = shape.moe_layers * shape.num_experts * shape.expert_params
    routed_active = shape.moe_layers * shape.top_k * shape.expert_params
    shared = shape.moe_layers * shape.shared_expert_params
    router = shape.moe_layers * shape.router_params
    comps = {
        "embedding": Component(embed, embed),
        "attention": Component(attn, attn),
        "norms": Component(norms, norms),
        "dense_mlp": Component(dense, dense),
        "routed_experts": Component(routed_total, routed_active),
        "shared_experts": Component(shared, shared),
        "router": Component(router, router),
        "lm_head": Component(head, head),
    }
    comps = {k: c for k, c in comps.items() if c.total}
    total = sum(c.total for c in comps.values())
    active = sum(c.active for c in comps.values())
    no_embed = active - (0 if shape.tied_embeddings else embed)
    sparsity = 1 - shape.top_k / shape.num_experts if shape.num_experts > 1 else 0.0
    score_dim, value_dim = shape.attn.score_value_dims()
    return ModelSpec(
        name=name, architecture=shape.architecture, num_layers=shape.num_layers,
        moe_layers=shape.moe_layers, hidden_size=h, vocab_size=v,
        num_experts=max(shape.num_experts, 1), top_k=max(shape.top_k, 1),
        shared_experts=shape.shared_experts, total_params=total, active_params=active,
        active_params_no_embed=no_embed, sparsity=sparsity, expert_params=shape.expert_params,
        embedding_params=embed, lm_head_params=head,
        kv_elements_per_token=shape.attn.kv_elements_per_token(),
        attn_score_dim=score_dim, attn_value_dim=value_dim, components=comps,
        sliding_window=shape.sliding_window, sliding_layers=shape.sliding_layers if shape.sliding_window else 0,
        mla={"num_heads": shape.attn.num_heads, "kv_lora_rank": shape.attn.kv_lora_rank,
             "qk_rope_head_dim": shape.attn.qk_rope_head_dim} if shape.attn.kind == "mla" else {})


# --- per-architecture normalisers ---------------------------------------------

def _gqa(c: Mapping[str, Any], **extra: Any) -> AttnShape:
    heads = int(c["num_attention_heads"])
    head_dim = int(c.get("head_dim") or c["hidden_size"] // heads)
    return AttnShape("gqa", heads, int(c.get("num_key_value_heads") or heads), head_dim, **extra)


def _swiglu(hidden: int, inter: int) -> int:
    return 3 * hidden * inter


def _base(c: Mapping[str, Any], arch: str, attn: AttnShape, norm_per_layer: int | None = None,
          **moe: Any) -> ArchShape:
    h = int(c["hidden_size"])
    return ArchShape(
        architecture=arch, vocab_size=int(c["vocab_size"]), hidden_size=h,
        num_layers=int(c["num_hidden_layers"]), tied_embeddings=bool(c.get("tie_word_embeddings", False)),
        attn=attn, norm_params_per_layer=2 * h if norm_per_layer is None else norm_per_layer,
        final_norm_params=h, **moe)


def _dense_llama(c: Mapping[str, Any]) -> ArchShape:
    h = int(c["hidden_size"])
    return _base(c, str(c["model_type"]), _gqa(c, qkv_bias=bool(c.get("attention_bias", False))
                                              or c["model_type"] == "qwen2"),
                 dense_layers=int(c["num_hidden_layers"]),
                 dense_mlp_params=_swiglu(h, int(c["intermediate_size"])))


def _mixtral(c: Mapping[str, Any]) -> ArchShape:
    h, e = int(c["hidden_size"]), int(c["num_local_experts"])
    return _base(c, "mixtral", _gqa(c), moe_layers=int(c["num_hidden_layers"]), num_experts=e,
                 top_k=int(c["num_experts_per_tok"]),
                 expert_params=_swiglu(h, int(c["intermediate_size"])), router_params=h * e)


def _qwen_sparse_layers(c: Mapping[str, Any]) -> int:
    layers = int(c["num_hidden_layers"])
    step = int(c.get("decoder_sparse_step", 1) or 1)
    dense_only = set(c.get("mlp_only_layers") or [])
    return sum(1 for i in range(layers) if i not in dense_only and (i + 1) % step == 0)


def _qwen_moe(c: Mapping[str, Any]) -> ArchShape:
    h, e, layers = int(c["hidden_size"]), int(c["num_experts"]), int(c["num_hidden_layers"])
    moe_layers = _qwen_sparse_layers(c)
    qwen3 = c["model_type"] == "qwen3_moe"
    shared_inter = int(c.get("shared_expert_intermediate_size") or 0)
    head_dim = int(c.get("head_dim") or h // int(c["num_attention_heads"]))
    attn = _gqa(c, qkv_bias=not qwen3 or bool(c.get("attention_bias", False)),
                qk_norm=2 * head_dim if qwen3 else 0)
    return _base(c, str(c["model_type"]), attn,
                 dense_layers=layers - moe_layers, dense_mlp_params=_swiglu(h, int(c["intermediate_size"])),
                 moe_layers=moe_layers, num_experts=e, top_k=int(c["num_experts_per_tok"]),
                 expert_params=_swiglu(h, int(c["moe_intermediate_size"])),
                 shared_expert_params=_swiglu(h, shared_inter) + h if shared_inter else 0,
                 shared_experts=1 if shared_inter else 0, router_params=h * e)


def _deepseek(c: Mapping[str, Any]) -> ArchShape:
    h, layers, e = int(c["hidden_size"]), int(c["num_hidden_layers"]), int(c["n_routed_experts"])
    first_dense = int(c.get("first_k_dense_replace", 0))
    freq = int(c.get("moe_layer_freq", 1) or 1)
    moe_layers = sum(1 for i in range(layers) if i >= first_dense and i % freq == 0)
    shared = int(c.get("n_shared_experts") or 0)
    expert = _swiglu(h, int(c["moe_intermediate_size"]))
    attn = AttnShape("mla", int(c["num_attention_heads"]), q_lora_rank=int(c.get("q_lora_rank") or 0),
                     kv_lora_rank=int(c["kv_lora_rank"]), qk_nope_head_dim=int(c["qk_nope_head_dim"]),
                     qk_rope_head_dim=int(c["qk_rope_head_dim"]), v_head_dim=int(c["v_head_dim"]))
    bias = e if c.get("topk_method") == "noaux_tc" or c["model_type"] == "deepseek_v3" else 0
    return _base(c, str(c["model_type"]), attn,
                 dense_layers=layers - moe_layers, dense_mlp_params=_swiglu(h, int(c["intermediate_size"])),
                 moe_layers=moe_layers, num_experts=e, top_k=int(c["num_experts_per_tok"]),
                 expert_params=expert, shared_expert_params=shared * expert, shared_experts=shared,
                 router_params=h * e + bias)


def _olmoe(c: Mapping[str, Any]) -> ArchShape:
    h, e = int(c["hidden_size"]), int(c["num_experts"])
    attn = _gqa(c)
    kv = attn.num_kv_heads * attn.head_dim
    attn = AttnShape("gqa", attn.num_heads, attn.num_kv_heads, attn.head_dim, qk_norm=h + kv)
    return _base(c, "olmoe", attn, moe_layers=int(c["num_hidden_layers"]), num_experts=e,
                 top_k=int(c["num_experts_per_tok"]),
                 expert_params=_swiglu(h, int(c["intermediate_size"])), router_params=h * e)


def _gpt_oss(c: Mapping[str, Any]) -> ArchShape:
    h, e, inter = int(c["hidden_size"]), int(c["num_local_experts"]), int(c["intermediate_size"])
    attn = _gqa(c, qkv_bias=True, o_bias=True, sinks=True)
    expert = h * 2 * inter + 2 * inter + inter * h + h  # gate_up and down, with biases
    return _base(c, "gpt_oss", attn, moe_layers=int(c["num_hidden_layers"]), num_experts=e,
                 top_k=int(c.get("num_experts_per_tok") or c["experts_per_token"]),
                 expert_params=expert, router_params=h * e + e)


def _dbrx(c: Mapping[str, Any]) -> ArchShape:
    h, heads = int(c["d_model"]), int(c["n_heads"])
    attn_cfg, ffn = c.get("attn_config", {}), c.get("ffn_config", {})
    flat = {"hidden_size": h, "vocab_size": c["vocab_size"], "num_hidden_layers": c["n_layers"],
            "tie_word_embeddings": c.get("tie_word_embeddings", False)}
    e = int(ffn["moe_num_experts"])
    attn = AttnShape("gqa", heads, int(attn_cfg.get("kv_n_heads", heads)), h // heads)  # Wqkv: same count fused
    return _base(flat, "dbrx", attn, moe_layers=int(c["n_layers"]), num_experts=e,
                 top_k=int(ffn["moe_top_k"]), expert_params=_swiglu(h, int(ffn["ffn_hidden_size"])),
                 router_params=h * e)


def _phimoe(c: Mapping[str, Any]) -> ArchShape:
    h, e = int(c["hidden_size"]), int(c["num_local_experts"])
    bias = bool(c.get("attention_bias", False))
    shape = _base(c, "phimoe", _gqa(c, qkv_bias=bias, o_bias=bias), norm_per_layer=4 * h,
                  moe_layers=int(c["num_hidden_layers"]), num_experts=e, top_k=int(c["num_experts_per_tok"]),
                  expert_params=_swiglu(h, int(c["intermediate_size"])), router_params=h * e,
                  lm_head_bias=bool(c.get("lm_head_bias", False)))
    return ArchShape(**{**asdict(shape), "attn": shape.attn, "final_norm_params": 2 * h})


ARCHITECTURES: dict[str, Callable[[Mapping[str, Any]], ArchShape]] = {
    "mixtral": _mixtral,
    "qwen2_moe": _qwen_moe,
    "qwen3_moe": _qwen_moe,
    "deepseek_v2": _deepseek,
    "deepseek_v3": _deepseek,
    "olmoe": _olmoe,
    "gpt_oss": _gpt_oss,
    "dbrx": _dbrx,
    "phimoe": _phimoe,
    "llama": _dense_llama,
    "mistral": _dense_llama,
    "qwen2": _dense_llama,
    "qwen3": _dense_llama,
}


def sliding_attention(c: Mapping[str, Any]) -> tuple[int, int]:
    """(window, layers using it) from a config, 0 when no layer is windowed.

    * ``layer_types`` (gpt-oss, newer transformers configs): the ``sliding_attention`` layers;
    * Qwen (``use_sliding_window``): layers from ``max_window_layers`` on (the first ones stay full);
    * Mistral/Mixtral-style ``sliding_window`` set on its own: every layer.
    """
    window = int(c.get("sliding_window") or 0)
    layers = int(c.get("num_hidden_layers") or c.get("n_layers") or 0)
    if not window:
        return 0, 0
    if c.get("layer_types"):
        return window, sum(1 for t in c["layer_types"] if t == "sliding_attention")
    if str(c.get("model_type", "")).startswith("qwen"):
        if not c.get("use_sliding_window"):
            return 0, 0
        return window, max(0, layers - int(c.get("max_window_layers", layers)))
    return window, layers


def spec_from_config(config: Mapping[str, Any], name: str = "model") -> ModelSpec:
    """Analytics for a Hugging Face config dict (as any transformers version wrote it)."""
    config = normalize(config)
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise CapbenchError(
            f"unsupported architecture model_type={model_type!r}; supported: {', '.join(sorted(ARCHITECTURES))}")
    try:
        shape = ARCHITECTURES[str(model_type)](config)
    except KeyError as exc:
        raise CapbenchError(f"config of {name} ({model_type}) lacks the field {exc.args[0]!r}") from None
    window, layers = sliding_attention(config)
    return count(replace(shape, sliding_window=window, sliding_layers=layers), name)


def load_config(path: Path) -> dict[str, Any]:
    """Read config.json from a file or a model directory (``checkpoint.read_config``)."""
    return read_config(path)


def config_from_gguf(path: Path) -> dict[str, Any]:
    """An HF-style config dict from GGUF metadata, for the architectures llama.cpp's converter writes and the
    analytics count: qwen3moe, qwen2moe, llama (dense and Mixtral), deepseek2, phimoe. The vocabulary is the
    embedding table's rows (a padded vocabulary included)."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError) as exc:
        raise CapbenchError(f"{path} is not a readable GGUF file: {exc}") from None
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    tensors = {t.name: [int(n) for n in t.shape] for t in reader.tensors}
    arch = str(meta.get("general.architecture"))
    if arch not in GGUF_ARCHITECTURES:
        raise CapbenchError(f"{path}: GGUF architecture {arch!r} is not one the analytics count; they count "
                            f"{', '.join(sorted(GGUF_ARCHITECTURES))}")

    def key(name: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{name}", default)

    heads, hidden = int(key("attention.head_count")), int(key("embedding_length"))
    embed = tensors.get("token_embd.weight") or [hidden, 0]
    cfg: dict[str, Any] = {
        "vocab_size": embed[1], "hidden_size": hidden, "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads, "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "head_dim": int(key("attention.key_length", hidden // heads)),
        "intermediate_size": int(key("feed_forward_length", 0) or 0),
        "tie_word_embeddings": "output.weight" not in tensors,
        "num_experts_per_tok": int(key("expert_used_count", 0) or 0),
        "max_position_embeddings": int(key("context_length", 0) or 0) or None,
    }
    cfg.update(GGUF_ARCHITECTURES[arch](key, tensors, cfg))
    return cfg


def _gguf_qwen3moe(key: Any, tensors: dict[str, list[int]], cfg: dict[str, Any]) -> dict[str, Any]:
    return {"model_type": "qwen3_moe", "num_experts": int(key("expert_count")),
            "moe_intermediate_size": int(key("expert_feed_forward_length"))}


def _gguf_qwen2moe(key: Any, tensors: dict[str, list[int]], cfg: dict[str, Any]) -> dict[str, Any]:
    return {"model_type": "qwen2_moe", "num_experts": int(key("expert_count")),
            "moe_intermediate_size": int(key("expert_feed_forward_length")),
            "shared_expert_intermediate_size": int(key("expert_shared_feed_forward_length", 0))}


def _gguf_llama(key: Any, tensors: dict[str, list[int]], cfg: dict[str, Any]) -> dict[str, Any]:
    experts = int(key("expert_count", 0) or 0)
    return {"model_type": "mixtral", "num_local_experts": experts} if experts else {"model_type": "llama"}


def _gguf_phimoe(key: Any, tensors: dict[str, list[int]], cfg: dict[str, Any]) -> dict[str, Any]:
    return {"model_type": "phimoe", "num_local_experts": int(key("expert_count")),
            "attention_bias": "blk.0.attn_q.bias" in tensors, "lm_head_bias": "output.bias" in tensors}


def _gguf_deepseek2(key: Any, tensors: dict[str, list[int]], cfg: dict[str, Any]) -> dict[str, Any]:
    rope = int(key("rope.dimension_count"))
    return {"model_type": "deepseek_v2", "n_routed_experts": int(key("expert_count")),
            "n_shared_experts": int(key("expert_shared_count", 0)),
            "first_k_dense_replace": int(key("leading_dense_block_count", 0)),
            "moe_intermediate_size": int(key("expert_feed_forward_length")),
            "q_lora_rank": int(key("attention.q_lora_rank", 0) or 0) or None,
            "kv_lora_rank": int(key("attention.kv_lora_rank")), "qk_rope_head_dim": rope,
            "qk_nope_head_dim": int(key("attention.key_length_mla")) - rope,
            "v_head_dim": int(key("attention.value_length_mla"))}


GGUF_ARCHITECTURES: dict[str, Callable[[Any, dict[str, list[int]], dict[str, Any]], dict[str, Any]]] = {
    "qwen3moe": _gguf_qwen3moe, "qwen2moe": _gguf_qwen2moe, "llama": _gguf_llama, "phimoe": _gguf_phimoe,
    "deepseek2": _gguf_deepseek2,
}


def spec_from_gguf(path: Path, name: str | None = None) -> ModelSpec:
    return spec_from_config(config_from_gguf(path), name or path.stem)


def config_of(path: Path) -> dict[str, Any] | None:
    """The config dict analytics would use for ``path`` (config.json or GGUF metadata), None if unreadable."""
    try:
        return config_from_gguf(path) if path.suffix == ".gguf" else load_config(path)
    except CapbenchError:
        return None


def spec_from_path(path: Path, name: str | None = None) -> ModelSpec:
    """Analytics from a model directory, a config.json or a .gguf file."""
    if path.suffix == ".gguf":
        return spec_from_gguf(path, name)
    return spec_from_config(load_config(path), name or path.name)
