"""A plain-PyTorch MoE decoder for every family :mod:`capbench_torch_moe.arch` reads.

One module serves three purposes: training the embedded tiny MoE, prefilling a prompt, and batched decode
over a slot-based KV cache. Routing is exposed so the engine can count, per layer and decode step, the
tokens each expert took and how many distinct experts ran.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from capbench_torch_moe.arch import MoEConfig
from capbench_torch_moe.layers import (
    MLP,
    Attention,
    LatentAttention,
    MoE,
    Norm,
    Rotary,
    causal_mask,
    decode_mask,
)

__all__ = ["ForwardStats", "KVCache", "MoEConfig", "MoETransformer", "init_weights"]


class Block(nn.Module):
    """One decoder layer: pre-norm attention, then a pre-norm MoE or dense MLP, each added to the residual."""

    def __init__(self, cfg: MoEConfig, index: int):
        super().__init__()
        self.input_norm = Norm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm)
        self.post_attn_norm = Norm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm)
        self.attn: Attention | LatentAttention = (
            LatentAttention(cfg) if cfg.mla else Attention(cfg, cfg.windows[index] if cfg.windows else None))
        self.moe = MoE(cfg) if not cfg.moe_layers or cfg.moe_layers[index] else None
        self.mlp = None if self.moe else MLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)


@dataclass
class ForwardStats:
    """What one forward pass routed, per MoE layer: distinct experts, tokens per expert, top-k ids, and the
    router logits when training asks for them."""

    distinct_experts: list[int] = field(default_factory=list)
    expert_tokens: list[list[int]] = field(default_factory=list)
    router_logits: list[torch.Tensor] = field(default_factory=list)
    topk_ids: list[torch.Tensor] = field(default_factory=list)


class MoETransformer(nn.Module):
    """Decoder-only MoE transformer whose weights load from the family's Hugging Face layout."""

    def __init__(self, cfg: MoEConfig, max_positions: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.final_norm = Norm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size,
                                                                       bias=cfg.lm_head_bias)
        assert cfg.rope is not None
        self.rotary = Rotary(cfg.rope)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self.final_norm(x)
        if self.lm_head is None:
            return F.linear(x, self.embed.weight)
        return self.lm_head(x)

    def _mlp(self, block: Block, x: torch.Tensor, stats: ForwardStats | None, keep_logits: bool) -> torch.Tensor:
        if block.moe is None:
            assert block.mlp is not None
            return block.mlp(x)
        moe = block.moe
        b, t, h = x.shape
        flat = x.reshape(-1, h)
        logits, weights, ids = moe.router(flat)
        y, counts = moe.experts(flat, weights, ids)
        if moe.shared is not None:
            shared = moe.shared(flat)
            if moe.shared_gate is not None:
                shared = torch.sigmoid(moe.shared_gate(flat)) * shared
            y = y + shared
        if stats is not None:
            stats.distinct_experts.append(len(counts))
            tokens = [0] * self.cfg.num_experts
            for expert, count in counts:
                tokens[expert] = count
            stats.expert_tokens.append(tokens)
            stats.topk_ids.append(ids)
            if keep_logits:
                stats.router_logits.append(logits)
        return y.view(b, t, h)

    def forward(self, input_ids: torch.Tensor, stats: ForwardStats | None = None,
                keep_router_logits: bool = False,
                kv_out: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
        """Full causal forward over [B, T] tokens from position 0 -> logits [B, T, V].

        Used for training and for prefill; when kv_out is given, each layer's cache entries (keys and values,
        or MLA's latent and rotary key) are appended to it, [B, T, ...] each.
        """
        _, t = input_ids.shape
        positions = torch.arange(t, device=input_ids.device)
        cos, sin = self.rotary.at(positions, self.dtype, long=self.rotary.uses_long(t))
        masks: dict[int | None, torch.Tensor | None] = {}
        x = self.embed(input_ids)
        for block in self.blocks:
            attn = block.attn
            q, k, v = attn.project(block.input_norm(x), self.rotary, cos, sin)
            if kv_out is not None:
                kv_out.append((k, v))
            if attn.window not in masks:
                masks[attn.window] = causal_mask(t, attn.window, x.device)
            keys, values = attn.keys_values((k, v))
            x = x + attn.output(q, keys, values, masks[attn.window])
            x = x + self._mlp(block, block.post_attn_norm(x), stats, keep_router_logits)
        return self.logits(x)

    def _decode_rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.rotary.at(positions.unsqueeze(1), self.dtype)
        if self.rotary.long is not None:  # LongRoPE: sequences past the original context use the long factors
            long = positions.unsqueeze(1) >= self.rotary.original
            if bool(long.any()):
                cos_l, sin_l = self.rotary.at(positions.unsqueeze(1), self.dtype, long=True)
                pick = long.view(-1, 1, 1, 1)
                cos, sin = torch.where(pick, cos_l, cos), torch.where(pick, sin_l, sin)
        return cos, sin

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
               stats: ForwardStats | None = None) -> torch.Tensor:
        """One decode step for B sequences in cache slots 0..B-1 -> logits [B, V]."""
        b = tokens.shape[0]
        length = int(positions.max()) + 1
        rows = torch.arange(b, device=tokens.device)
        cos, sin = self._decode_rope(positions)
        masks: dict[int | None, torch.Tensor] = {}
        x = self.embed(tokens).unsqueeze(1)
        for layer, block in enumerate(self.blocks):
            attn = block.attn
            q, k, v = attn.project(block.input_norm(x), self.rotary, cos, sin)
            kc, vc = cache.k[layer], cache.v[layer]
            kc[rows, positions] = k[:, 0]
            vc[rows, positions] = v[:, 0]
            if attn.window not in masks:
                masks[attn.window] = decode_mask(positions, length, attn.window)
            keys, values = attn.keys_values((kc[:b, :length], vc[:b, :length]))
            x = x + attn.output(q, keys, values, masks[attn.window])
            x = x + self._mlp(block, block.post_attn_norm(x), stats, keep_logits=False)
        return self.logits(x[:, 0])


class KVCache:
    """Per-layer cache tensors [slots, max_len, ...]; live sequences occupy slots 0..n-1.

    Grouped-query attention caches keys and values [.., nkv, D]; latent attention caches the compressed
    latent [.., kv_lora_rank] and the rotary key [.., qk_rope_head_dim] (in ``k`` and ``v``).
    """

    def __init__(self, cfg: MoEConfig, slots: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        if cfg.mla:
            k_shape: tuple[int, ...] = (slots, max_len, cfg.mla.kv_lora_rank)
            v_shape: tuple[int, ...] = (slots, max_len, cfg.mla.qk_rope_head_dim)
        else:
            k_shape = v_shape = (slots, max_len, cfg.num_kv_heads, cfg.head_dim)
        self.k = [torch.zeros(k_shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(v_shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.slots = slots
        self.max_len = max_len

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def store_prefill(self, slot: int, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for layer, (k, v) in enumerate(kv):
            t = k.shape[1]
            self.k[layer][slot, :t] = k[0]
            self.v[layer][slot, :t] = v[0]

    def move(self, src: int, dst: int, length: int) -> None:
        for layer in range(len(self.k)):
            self.k[layer][dst, :length] = self.k[layer][src, :length]
            self.v[layer][dst, :length] = self.v[layer][src, :length]


def init_weights(model: MoETransformer, seed: int, std: float = 0.02) -> None:
    """Deterministic normal init: matrices random, norm weights one, biases zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif name.endswith(("norm.weight", "q_norm.weight", "k_norm.weight")) and p.dim() == 1:
                p.fill_(1.0)
            else:
                p.zero_()
        for block in model.blocks:
            block.attn.o_proj.weight.mul_(1 / math.sqrt(2 * model.cfg.num_layers))
            if block.moe is not None:
                block.moe.experts.down.mul_(1 / math.sqrt(2 * model.cfg.num_layers))


def simulate_routing(model: MoETransformer, mode: str | None) -> MoETransformer:
    """Every MoE layer's router picks by ``mode`` ("uniform", "round-robin") instead of its scores; None: as
    trained."""
    for block in model.blocks:
        if block.moe is not None:
            block.moe.router.simulate = mode
    return model
