"""A plain-PyTorch MoE decoder for the Qwen3-MoE and Mixtral layouts.

One module serves three purposes: training the embedded tiny MoE, prefilling
a prompt, and batched decode over a slot-based KV cache. Routing is exposed so
the engine can count distinct activated experts per layer and step exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from capbench_core.analytics.checkpoint import read_config
from capbench_core.errors import CapbenchError

SUPPORTED_LAYOUTS = ("qwen3_moe", "mixtral")


@dataclass(frozen=True)
class MoEConfig:
    """The architecture fields the engine needs, read from an HF config.json."""

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
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> MoEConfig:
        model_type = cfg.get("model_type", "")
        if model_type not in SUPPORTED_LAYOUTS:
            raise CapbenchError(
                f"torch_moe cannot run model_type '{model_type}': "
                f"supported layouts are {', '.join(SUPPORTED_LAYOUTS)}"
            )
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        if model_type == "mixtral":
            experts, inter, norm_topk, qk_norm = (
                int(cfg["num_local_experts"]), int(cfg["intermediate_size"]), True, False)
        else:
            experts, inter, norm_topk, qk_norm = (
                int(cfg["num_experts"]), int(cfg["moe_intermediate_size"]),
                bool(cfg.get("norm_topk_prob", False)), True)
            if int(cfg.get("decoder_sparse_step", 1)) != 1 or cfg.get("mlp_only_layers"):
                raise CapbenchError("torch_moe supports Qwen3-MoE configs with every layer sparse "
                                    "(decoder_sparse_step=1, no mlp_only_layers)")
        eos = cfg.get("eos_token_id")
        return cls(
            model_type=model_type,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            num_experts=experts,
            top_k=int(cfg["num_experts_per_tok"]),
            moe_intermediate_size=inter,
            norm_topk_prob=norm_topk,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(cfg.get("rope_theta", 10000.0)),
            qk_norm=qk_norm,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
        )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32 (as transformers does), then cast back and scaled."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return weight * F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)


class RotaryTable:
    """cos/sin tables for rotate-half RoPE, indexed by absolute position."""

    def __init__(self, head_dim: int, theta: float, max_positions: int, dtype: torch.dtype):
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = emb.cos().to(dtype)
        self.sin = emb.sin().to(dtype)

    def at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for ``positions`` shaped to broadcast over a heads axis: [..., T, 1, D]."""
        return self.cos[positions].unsqueeze(-2), self.sin[positions].unsqueeze(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on x [..., T, heads, D]."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.cfg = cfg
        self.splits = [cfg.num_heads * d, cfg.num_kv_heads * d, cfg.num_kv_heads * d]
        self.qkv_proj = nn.Linear(h, sum(self.splits), bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=False)
        if cfg.qk_norm:
            self.q_norm = nn.Parameter(torch.ones(d))
            self.k_norm = nn.Parameter(torch.ones(d))

    def qkv(self, x: torch.Tensor, cos: torch.Tensor,
            sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [B, T, H] -> q [B, T, nh, D], k/v [B, T, nkv, D], RoPE applied."""
        b, t, _ = x.shape
        cfg = self.cfg
        q, k, v = self.qkv_proj(x).split(self.splits, dim=-1)
        q = q.view(b, t, cfg.num_heads, cfg.head_dim)
        k = k.view(b, t, cfg.num_kv_heads, cfg.head_dim)
        v = v.view(b, t, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q = rms_norm(q, self.q_norm, cfg.rms_norm_eps)
            k = rms_norm(k, self.k_norm, cfg.rms_norm_eps)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
        """q [B, Tq, nh, D], k/v [B, Tk, nkv, D] -> [B, Tq, nh*D]."""
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=mask, is_causal=causal and mask is None,
            enable_gqa=self.cfg.num_kv_heads != self.cfg.num_heads)
        b, _, tq, _ = out.shape
        return out.transpose(1, 2).reshape(b, tq, -1)


class SparseMoE(nn.Module):
    """Top-k routed experts; gate and up projections fused per expert."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        e, h, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.router = nn.Linear(h, e, bias=False)
        self.gate_up = nn.Parameter(torch.empty(e, 2 * i, h))
        self.down = nn.Parameter(torch.empty(e, h, i))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, H] -> (router logits [N, E], top-k weights [N, k], top-k ids [N, k])."""
        logits = self.router(x)
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.cfg.top_k, dim=-1)
        if self.cfg.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights.to(x.dtype), ids

    def experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Run each activated expert once on its tokens; returns (output, distinct experts).

        Token slots are grouped by expert (in Python for a decode-sized batch: one host
        sync and no sort kernels), each expert runs one fused gate/up matmul and one
        down matmul, and the slots are put back in order and summed over top-k.
        """
        n, k = ids.shape
        if n * k <= 256:
            groups: dict[int, list[int]] = {}
            for slot, expert in enumerate(ids.reshape(-1).tolist()):
                groups.setdefault(expert, []).append(slot)
            plan = sorted(groups.items())
            order = torch.tensor([slot for _, slots in plan for slot in slots])
            counts = [(expert, len(slots)) for expert, slots in plan]
        else:
            flat = ids.reshape(-1)
            order = torch.argsort(flat, stable=True)
            counts = [(e, c) for e, c in enumerate(torch.bincount(flat, minlength=self.cfg.num_experts).tolist())
                      if c]
        xs = x.index_select(0, order // k)
        outs, start = [], 0
        for expert, count in counts:
            gate, up = F.linear(xs[start:start + count], self.gate_up[expert]).chunk(2, dim=-1)
            outs.append(F.linear(F.silu(gate) * up, self.down[expert]))
            start += count
        y = torch.cat(outs) * weights.reshape(-1).index_select(0, order).unsqueeze(-1)
        y = y.index_select(0, torch.argsort(order))
        return y.view(n, k, -1).sum(1), len(counts)


class Block(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.input_norm = nn.Parameter(torch.ones(cfg.hidden_size))
        self.post_attn_norm = nn.Parameter(torch.ones(cfg.hidden_size))
        self.attn = Attention(cfg)
        self.moe = SparseMoE(cfg)


@dataclass
class ForwardStats:
    """What one forward pass routed: distinct experts per layer, router logits for training."""

    distinct_experts: list[int] = field(default_factory=list)
    router_logits: list[torch.Tensor] = field(default_factory=list)
    topk_ids: list[torch.Tensor] = field(default_factory=list)


class MoETransformer(nn.Module):
    """Decoder-only MoE transformer with HF-compatible weights."""

    def __init__(self, cfg: MoEConfig, max_positions: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.final_norm = nn.Parameter(torch.ones(cfg.hidden_size))
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._rope_positions = max_positions or cfg.max_position_embeddings
        self._rope: RotaryTable | None = None

    @property
    def rope(self) -> RotaryTable:
        dtype = self.embed.weight.dtype
        if self._rope is None or self._rope.cos.dtype != dtype:
            self._rope = RotaryTable(self.cfg.head_dim, self.cfg.rope_theta, self._rope_positions, dtype)
        return self._rope

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = rms_norm(x, self.final_norm, self.cfg.rms_norm_eps)
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(x, weight)

    def _moe(self, block: Block, x: torch.Tensor, stats: ForwardStats | None,
             keep_logits: bool) -> torch.Tensor:
        b, t, h = x.shape
        flat = rms_norm(x, block.post_attn_norm, self.cfg.rms_norm_eps).reshape(-1, h)
        logits, weights, ids = block.moe.route(flat)
        y, active = block.moe.experts(flat, weights, ids)
        if stats is not None:
            stats.distinct_experts.append(active)
            stats.topk_ids.append(ids)
            if keep_logits:
                stats.router_logits.append(logits)
        return x + y.view(b, t, h)

    def forward(self, input_ids: torch.Tensor, stats: ForwardStats | None = None,
                keep_router_logits: bool = False,
                kv_out: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
        """Full causal forward over [B, T] tokens from position 0 -> logits [B, T, V].

        Used for training and for prefill; when kv_out is given, each layer's
        post-RoPE keys and values ([B, T, nkv, D]) are appended to it.
        """
        _, t = input_ids.shape
        cos, sin = self.rope.at(torch.arange(t))
        x = self.embed(input_ids)
        for block in self.blocks:
            a = rms_norm(x, block.input_norm, self.cfg.rms_norm_eps)
            q, k, v = block.attn.qkv(a, cos, sin)
            if kv_out is not None:
                kv_out.append((k, v))
            x = x + block.attn.o_proj(block.attn.attend(q, k, v, None, causal=True))
            x = self._moe(block, x, stats, keep_router_logits)
        return self.logits(x)

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
               stats: ForwardStats | None = None) -> torch.Tensor:
        """One decode step for B sequences in cache slots 0..B-1 -> logits [B, V]."""
        b = tokens.shape[0]
        length = int(positions.max()) + 1
        keys = torch.arange(length)
        mask = (keys.unsqueeze(0) <= positions.unsqueeze(1)).view(b, 1, 1, length)
        rows = torch.arange(b)
        x = self.embed(tokens).unsqueeze(1)
        cos, sin = self.rope.at(positions.unsqueeze(1))
        for layer, block in enumerate(self.blocks):
            a = rms_norm(x, block.input_norm, self.cfg.rms_norm_eps)
            q, k, v = block.attn.qkv(a, cos, sin)
            kc, vc = cache.k[layer], cache.v[layer]
            kc[rows, positions] = k[:, 0]
            vc[rows, positions] = v[:, 0]
            attn = block.attn.attend(q, kc[:b, :length], vc[:b, :length], mask, causal=False)
            x = x + block.attn.o_proj(attn)
            x = self._moe(block, x, stats, keep_logits=False)
        return self.logits(x[:, 0])


class KVCache:
    """Per-layer K/V tensors [slots, max_len, nkv, D]; live sequences occupy slots 0..n-1."""

    def __init__(self, cfg: MoEConfig, slots: int, max_len: int, dtype: torch.dtype):
        shape = (slots, max_len, cfg.num_kv_heads, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype) for _ in range(cfg.num_layers)]
        self.slots = slots
        self.max_len = max_len

    def store_prefill(self, slot: int, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for layer, (k, v) in enumerate(kv):
            t = k.shape[1]
            self.k[layer][slot, :t] = k[0]
            self.v[layer][slot, :t] = v[0]

    def move(self, src: int, dst: int, length: int) -> None:
        for layer in range(len(self.k)):
            self.k[layer][dst, :length] = self.k[layer][src, :length]
            self.v[layer][dst, :length] = self.v[layer][src, :length]


# --- Hugging Face weight layout -------------------------------------------------

def _hf_names(cfg: MoEConfig, layer: int) -> dict[str, str]:
    p = f"model.layers.{layer}."
    moe = "block_sparse_moe." if cfg.model_type == "mixtral" else "mlp."
    return {
        "input_norm": p + "input_layernorm.weight",
        "post_attn_norm": p + "post_attention_layernorm.weight",
        "attn.o_proj.weight": p + "self_attn.o_proj.weight",
        "attn.q_norm": p + "self_attn.q_norm.weight",
        "attn.k_norm": p + "self_attn.k_norm.weight",
        "moe.router.weight": p + moe + "gate.weight",
        "experts": p + moe + "experts.",
    }


def _expert_names(cfg: MoEConfig) -> tuple[str, str, str]:
    """(gate, up, down) weight names inside one expert."""
    if cfg.model_type == "mixtral":
        return "w1.weight", "w3.weight", "w2.weight"
    return "gate_proj.weight", "up_proj.weight", "down_proj.weight"


def fused_views(model: MoETransformer) -> Iterator[tuple[torch.Tensor, str]]:
    """(view into one of our fused tensors, Hub name of that piece): q/k/v and expert weights."""
    cfg = model.cfg
    gate_n, up_n, down_n = _expert_names(cfg)
    inter = cfg.moe_intermediate_size
    for i, block in enumerate(model.blocks):
        p = f"model.layers.{i}.self_attn."
        q, k, v = block.attn.qkv_proj.weight.split(block.attn.splits, dim=0)
        yield from ((q, p + "q_proj.weight"), (k, p + "k_proj.weight"), (v, p + "v_proj.weight"))
        prefix = _hf_names(cfg, i)["experts"]
        for e in range(cfg.num_experts):
            yield block.moe.gate_up[e, :inter], f"{prefix}{e}.{gate_n}"
            yield block.moe.gate_up[e, inter:], f"{prefix}{e}.{up_n}"
            yield block.moe.down[e], f"{prefix}{e}.{down_n}"


def to_hf_state_dict(model: MoETransformer) -> dict[str, torch.Tensor]:
    """Our parameters under the Hub's per-expert names (what from_pretrained reads)."""
    out = hf_named_parameters(model)
    out.update((name, view) for view, name in fused_views(model))
    return {k: v.detach().contiguous() for k, v in out.items()}


def hf_named_parameters(model: MoETransformer) -> dict[str, torch.Tensor]:
    """Live non-expert parameters keyed by their Hub names."""
    cfg = model.cfg
    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": model.embed.weight,
                                    "model.norm.weight": model.final_norm}
    if model.lm_head is not None:
        out["lm_head.weight"] = model.lm_head.weight
    for i, block in enumerate(model.blocks):
        params = dict(block.named_parameters())
        for ours, theirs in _hf_names(cfg, i).items():
            if ours in params:
                out[theirs] = params[ours]
    return out


def _read_config(model_dir: Path) -> dict[str, Any]:
    return read_config(model_dir)


def _open_weights(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CapbenchError(f"no *.safetensors weights in {model_dir}")
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    yield name, handle.get_tensor(name)
        except SafetensorError as exc:
            raise CapbenchError(f"{file} is not a readable safetensors file: {exc}") from None


def load_hf(model_dir: Path, dtype: torch.dtype = torch.float32,
            max_positions: int | None = None) -> MoETransformer:
    """Load a Hub-layout checkpoint (config.json + *.safetensors) into MoETransformer."""
    cfg = MoEConfig.from_hf(_read_config(model_dir))
    tensors = dict(_open_weights(model_dir))
    with torch.device("meta"):
        model = MoETransformer(cfg, max_positions)
    model = model.to_empty(device="cpu")
    pieces = list(hf_named_parameters(model).items()) + [(name, view) for view, name in fused_views(model)]

    def take(name: str) -> torch.Tensor:
        try:
            return tensors.pop(name).to(dtype)
        except KeyError:
            raise CapbenchError(f"{model_dir}: weight '{name}' is missing from the safetensors files") from None

    with torch.no_grad():
        for name, target in pieces:
            source = take(name)
            if tuple(source.shape) != tuple(target.shape):
                raise CapbenchError(f"{model_dir}: weight '{name}' has shape {tuple(source.shape)}, "
                                    f"config.json implies {tuple(target.shape)}")
            target.copy_(source)
    model = model.to(dtype)
    model.eval()
    model.requires_grad_(False)
    return model


def init_weights(model: MoETransformer, seed: int, std: float = 0.02) -> None:
    """Deterministic normal init (norm weights stay at one)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            else:
                p.fill_(1.0)
        for block in model.blocks:
            block.attn.o_proj.weight.mul_(1 / math.sqrt(2 * model.cfg.num_layers))
            block.moe.down.mul_(1 / math.sqrt(2 * model.cfg.num_layers))
