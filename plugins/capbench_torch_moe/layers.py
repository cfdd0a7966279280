"""The pieces every family is built from, each written once: norms, RoPE variants, attention (GQA and
DeepSeek's latent attention), routers and experts.

Shapes: activations are [B, T, H]; attention works on [B, T, heads, D]; routers and experts on the
flattened tokens [N, H]. Each computation follows transformers' eager implementation of the family
(float32 softmaxes and norms, the same order of operations) so float32 logits agree to ~1e-6.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from capbench_torch_moe.arch import MLASpec, MoEConfig, RopeSpec, yarn_mscale

# --- norms --------------------------------------------------------------------------------------------

class Norm(nn.Module):
    """RMSNorm computed in float32 (``rms``: scaled after the cast back, ``rms_after``: before) or LayerNorm."""

    def __init__(self, size: int, eps: float, kind: str = "rms"):
        super().__init__()
        self.kind, self.eps = kind, eps
        self.weight = nn.Parameter(torch.ones(size))
        self.bias = nn.Parameter(torch.zeros(size)) if kind == "layer" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layer":
            return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        normed = F.rms_norm(x.float(), (x.shape[-1],), None, self.eps)
        if self.kind == "rms_after":
            return (self.weight.float() * normed).to(x.dtype)
        return self.weight * normed.to(x.dtype)


# --- rotary embeddings ----------------------------------------------------------------------------------

def inverse_frequencies(spec: RopeSpec, long: bool = False) -> tuple[torch.Tensor, float]:
    """(inv_freq [dim/2], attention factor) for one RoPE variant, as transformers computes them."""
    dim, base = spec.dim, spec.theta
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv = 1.0 / (base ** exponents)
    if spec.kind == "linear":
        return inv / float(spec.param("factor")), 1.0
    if spec.kind == "llama3":
        return _llama3(spec, inv), 1.0
    if spec.kind == "yarn":
        return _yarn(spec)
    if spec.kind == "longrope":
        original = int(spec.param("original_max_position_embeddings"))
        factors = torch.tensor(spec.param("long_factor" if long else "short_factor"), dtype=torch.float32)
        inv = 1.0 / (factors * base ** exponents)
        mscale = spec.param("long_mscale" if long else "short_mscale")
        if mscale is not None:  # Phi-3.5-MoE states its scales
            return inv, float(mscale)
        factor = spec.param("factor") or spec.max_position_embeddings / original
        attention = spec.param("attention_factor")
        if attention is None:
            attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
        return inv, float(attention)
    return inv, 1.0


def _llama3(spec: RopeSpec, inv: torch.Tensor) -> torch.Tensor:
    factor, low, high = (float(spec.param(k)) for k in ("factor", "low_freq_factor", "high_freq_factor"))
    old = float(spec.param("original_max_position_embeddings"))
    low_wavelen, high_wavelen = old / low, old / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(spec: RopeSpec) -> tuple[torch.Tensor, float]:
    dim, base = spec.dim, spec.theta
    original = int(spec.param("original_max_position_embeddings"))
    factor = spec.param("factor") or spec.max_position_embeddings / original
    attention = spec.param("attention_factor")
    if attention is None:
        mscale, mscale_all = spec.param("mscale"), spec.param("mscale_all_dim")
        attention = (yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all) if mscale and mscale_all
                     else yarn_mscale(factor))
    fast, slow = spec.param("beta_fast") or 32, spec.param("beta_slow") or 1

    def correction(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction(fast), correction(slow)
    if spec.param("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv = (1.0 / (factor * pos)) * (1 - extrapolation) + (1.0 / pos) * extrapolation
    return inv, float(attention)


class Rotary:
    """cos/sin tables [positions, dim/2] (attention factor applied), grown on demand, per dtype/device."""

    def __init__(self, spec: RopeSpec):
        self.spec = spec
        with torch.device("cpu"):  # plain tables, even while the model is being built on the meta device
            self.inv, self.factor = inverse_frequencies(spec)
            self.long: tuple[torch.Tensor, float] | None = (
                inverse_frequencies(spec, long=True) if spec.kind == "longrope" else None)
        self.original = int(spec.param("original_max_position_embeddings") or 0)
        self._tables: dict[tuple[bool, torch.dtype, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def table(self, length: int, dtype: torch.dtype, device: torch.device,
              long: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        key = (long, dtype, str(device))
        cached = self._tables.get(key)
        if cached is None or cached[0].shape[0] < length:
            size = max(length, 2 * cached[0].shape[0] if cached else 256)
            inv, factor = self.long if long and self.long else (self.inv, self.factor)
            freqs = torch.outer(torch.arange(size, dtype=torch.float32), inv)
            cached = ((freqs.cos() * factor).to(device=device, dtype=dtype),
                      (freqs.sin() * factor).to(device=device, dtype=dtype))
            self._tables[key] = cached
        return cached

    def at(self, positions: torch.Tensor, dtype: torch.dtype, long: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for ``positions`` [..., T], shaped [..., T, 1, dim/2] to broadcast over heads."""
        cos, sin = self.table(int(positions.max()) + 1, dtype, positions.device, long)
        return cos[positions].unsqueeze(-2), sin[positions].unsqueeze(-2)

    def uses_long(self, length: int) -> bool:
        """LongRoPE switches to its long factors once a sequence passes the original context."""
        return self.long is not None and length > self.original

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate x [..., dim]: halves (x_i, x_{i+dim/2}) or, for interleaved layouts, pairs (x_2i, x_2i+1).
        The interleaved result comes out de-interleaved; queries and keys share the layout, so q·k is unchanged."""
        if self.spec.interleaved:
            x1, x2 = x[..., 0::2], x[..., 1::2]
        else:
            x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


# --- attention ------------------------------------------------------------------------------------------

def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None, scale: float,
           sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention: q [B, Tq, nh, D], k [B, Tk, nkv, D], v [B, Tk, nkv, Dv] -> [B, Tq, nh * Dv].

    ``allowed`` is a boolean mask broadcastable to [B, 1, Tq, Tk] (None: causal, Tq == Tk). Attention sinks
    (gpt-oss) are one extra logit per head that takes probability mass and gives nothing back: a zero key
    whose mask entry is the sink value, with a zero value.
    """
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    mask: torch.Tensor | None = allowed
    if sinks is not None:
        b, tq, tk = q.shape[0], q.shape[2], k.shape[2]
        if allowed is None:
            allowed = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril()
        logits = torch.zeros((), dtype=q.dtype, device=q.device).masked_fill(~allowed, float("-inf"))
        logits = logits.expand(b, q.shape[1], tq, tk)
        column = sinks.to(q.dtype).view(1, -1, 1, 1).expand(b, -1, tq, 1)
        mask = torch.cat((logits, column), dim=-1)
        k = torch.cat((k, k.new_zeros(*k.shape[:2], 1, k.shape[3])), dim=2)
        v = torch.cat((v, v.new_zeros(*v.shape[:2], 1, v.shape[3])), dim=2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                         enable_gqa=k.shape[1] != q.shape[1])
    b, _, tq, _ = out.shape
    return out.transpose(1, 2).reshape(b, tq, -1)


def causal_mask(length: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """[T, T] keys each query may see (None when plain causal attention says it all)."""
    if window is None:
        return None
    q = torch.arange(length, device=device).unsqueeze(1)
    k = torch.arange(length, device=device).unsqueeze(0)
    return (k <= q) & (k > q - window)


def decode_mask(positions: torch.Tensor, length: int, window: int | None) -> torch.Tensor:
    """[B, 1, 1, L]: cached keys each sequence's new token may see."""
    keys = torch.arange(length, device=positions.device).unsqueeze(0)
    pos = positions.unsqueeze(1)
    allowed = keys <= pos
    if window is not None:
        allowed &= keys > pos - window
    return allowed.view(positions.shape[0], 1, 1, length)


class Attention(nn.Module):
    """Grouped-query attention with the families' options: biases, per-head or full-width q/k norms, QKV
    clipping, sliding windows and sinks. q, k and v are one fused projection."""

    def __init__(self, cfg: MoEConfig, window: int | None):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.cfg, self.window, self.scale = cfg, window, cfg.attention_scale
        self.splits = [cfg.num_heads * d, cfg.num_kv_heads * d, cfg.num_kv_heads * d]
        self.qkv_proj = nn.Linear(h, sum(self.splits), bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=cfg.o_bias)
        self.q_norm = self.k_norm = None
        if cfg.qk_norm_kind == "head":
            self.q_norm, self.k_norm = Norm(d, cfg.rms_norm_eps), Norm(d, cfg.rms_norm_eps)
        elif cfg.qk_norm_kind == "full":
            self.q_norm, self.k_norm = Norm(self.splits[0], cfg.rms_norm_eps), Norm(self.splits[1], cfg.rms_norm_eps)
        self.sinks = nn.Parameter(torch.zeros(cfg.num_heads)) if cfg.sinks else None

    def project(self, x: torch.Tensor, rope: Rotary, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, H] -> q [B, T, nh, D], k / v [B, T, nkv, D], RoPE applied (k and v are what is cached)."""
        b, t, _ = x.shape
        cfg = self.cfg
        q, k, v = self.qkv_proj(x).split(self.splits, dim=-1)
        if cfg.qk_norm_kind == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if cfg.clip_qkv is not None:
            q, k, v = (z.clamp(-cfg.clip_qkv, cfg.clip_qkv) for z in (q, k, v))
        q = q.reshape(b, t, cfg.num_heads, cfg.head_dim)
        k = k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm_kind == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        return rope.apply(q, cos, sin), rope.apply(k, cos, sin), v

    def keys_values(self, cached: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return cached

    def output(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
        return self.o_proj(attend(q, k, v, allowed, self.scale, self.sinks))


class LatentAttention(nn.Module):
    """DeepSeek's multi-head latent attention. What is cached per token is the normalised KV latent
    [kv_lora_rank] and the rotary key [qk_rope_head_dim] (shared by all heads); keys and values are expanded
    from the latent when attending."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        mla = cfg.mla
        assert mla is not None
        self.cfg, self.mla, self.window, self.scale = cfg, mla, None, cfg.attention_scale
        h, nh = cfg.hidden_size, cfg.num_heads
        qk = mla.qk_nope_head_dim + mla.qk_rope_head_dim
        if mla.q_lora_rank is None:
            self.q_proj = nn.Linear(h, nh * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(h, mla.q_lora_rank, bias=cfg.o_bias)
            self.q_a_norm = Norm(mla.q_lora_rank, 1e-6)
            self.q_b_proj = nn.Linear(mla.q_lora_rank, nh * qk, bias=False)
        self.kv_a_proj = nn.Linear(h, mla.kv_lora_rank + mla.qk_rope_head_dim, bias=cfg.o_bias)
        self.kv_a_norm = Norm(mla.kv_lora_rank, 1e-6)
        self.kv_b_proj = nn.Linear(mla.kv_lora_rank, nh * (mla.qk_nope_head_dim + mla.v_head_dim), bias=False)
        self.o_proj = nn.Linear(nh * mla.v_head_dim, h, bias=cfg.o_bias)
        self.sinks = None

    def project(self, x: torch.Tensor, rope: Rotary, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, H] -> q [B, T, nh, nope + rope], latent [B, T, kv_lora_rank], rotary key [B, T, rope]."""
        b, t, _ = x.shape
        mla = self.mla
        if mla.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_norm(self.q_a_proj(x)))
        q = q.view(b, t, self.cfg.num_heads, -1)
        q_nope, q_rot = q.split([mla.qk_nope_head_dim, mla.qk_rope_head_dim], dim=-1)
        latent, k_rot = self.kv_a_proj(x).split([mla.kv_lora_rank, mla.qk_rope_head_dim], dim=-1)
        k_rot = rope.apply(k_rot.unsqueeze(2), cos, sin).squeeze(2)
        return torch.cat((q_nope, rope.apply(q_rot, cos, sin)), dim=-1), self.kv_a_norm(latent), k_rot

    def keys_values(self, cached: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(latent [B, L, r], rotary key [B, L, rope]) -> keys [B, L, nh, nope + rope], values [B, L, nh, v]."""
        latent, k_rot = cached
        b, length, _ = latent.shape
        mla = self.mla
        kv = self.kv_b_proj(latent).view(b, length, self.cfg.num_heads, -1)
        k_nope, v = kv.split([mla.qk_nope_head_dim, mla.v_head_dim], dim=-1)
        k = torch.cat((k_nope, k_rot.unsqueeze(2).expand(-1, -1, self.cfg.num_heads, -1)), dim=-1)
        return k, v

    def output(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
        return self.o_proj(attend(q, k, v, allowed, self.scale))


def latent_cache_width(mla: MLASpec) -> tuple[int, int]:
    return mla.kv_lora_rank, mla.qk_rope_head_dim


# --- routers --------------------------------------------------------------------------------------------

class Router(nn.Module):
    """Scores the experts for each token and picks top-k: (logits [N, E], weights [N, k], ids [N, k])."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        spec = cfg.router
        self.spec, self.top_k, self.num_experts = spec, cfg.top_k, cfg.num_experts
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        self.bias = nn.Parameter(torch.zeros(cfg.num_experts)) if spec.bias else None
        self.correction = nn.Parameter(torch.zeros(cfg.num_experts)) if spec.kind == "deepseek_v3" else None
        #: "uniform" or "round-robin": the picked experts are replaced by a balanced assignment (benchmark
        #: only: the weights stay the router's, the tokens are no longer the model's)
        self.simulate: str | None = None
        self._picks: torch.Generator | None = None
        self._next = 0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, weights, ids = self._route(x)
        return (logits, weights, self._balanced(ids)) if self.simulate else (logits, weights, ids)

    def _balanced(self, ids: torch.Tensor) -> torch.Tensor:
        """As SGLang's SGLANG_SIMULATE_*_EXPERTS: each token gets k distinct experts drawn uniformly, or the
        next k in turn (token i: experts (i k + j) mod E, counted across calls)."""
        n, k = ids.shape
        if self.simulate == "round-robin":
            start = self._next + torch.arange(n, device=ids.device).unsqueeze(1) * k
            self._next += n * k
            return (start + torch.arange(k, device=ids.device)) % self.num_experts
        if self._picks is None:
            self._picks = torch.Generator(device=ids.device).manual_seed(0)
        scores = torch.rand(n, self.num_experts, generator=self._picks, device=ids.device)
        return torch.topk(scores, k, dim=-1).indices

    def _route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        spec = self.spec
        if spec.float32:
            logits = F.linear(x.float(), self.weight.float())
        else:
            logits = F.linear(x, self.weight, self.bias)
        if spec.kind == "topk_softmax":  # gpt-oss: pick on logits, then softmax over the picked
            top, ids = torch.topk(logits, self.top_k, dim=-1)
            return logits, F.softmax(top, dim=1, dtype=top.dtype), ids
        if spec.kind == "sparsemixer":
            weights, ids = sparsemixer(logits, spec.jitter_eps)
            return logits, weights, ids
        if spec.kind == "deepseek_v2":
            weights, ids = self._deepseek_v2(logits)
        elif spec.kind == "deepseek_v3":
            weights, ids = self._deepseek_v3(logits)
        else:
            probs = F.softmax(logits, dim=-1, dtype=torch.float32)
            weights, ids = torch.topk(probs, self.top_k, dim=-1)
            if spec.norm_topk_prob:
                weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights.to(logits.dtype), ids

    def _group_mask(self, group_scores: torch.Tensor) -> torch.Tensor:
        """[N, E] True for the experts of each token's topk_group best groups."""
        spec = self.spec
        picked = torch.topk(group_scores, k=spec.topk_group, dim=-1, sorted=False)[1]
        mask = torch.zeros_like(group_scores).scatter_(1, picked, 1)
        per_group = self.num_experts // spec.n_group
        return mask.unsqueeze(-1).expand(-1, spec.n_group, per_group).reshape(-1, self.num_experts).bool()

    def _deepseek_v2(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        spec = self.spec
        scores = logits.softmax(dim=-1, dtype=torch.float32)
        if spec.method == "group_limited_greedy":
            groups = scores.view(-1, spec.n_group, self.num_experts // spec.n_group).max(dim=-1).values
            scores = scores.masked_fill(~self._group_mask(groups), 0.0)
        weights, ids = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        return weights * spec.scaling, ids

    def _deepseek_v3(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        spec = self.spec
        assert self.correction is not None
        scores = logits.sigmoid()
        choice = scores + self.correction.float()
        groups = choice.view(-1, spec.n_group, self.num_experts // spec.n_group).topk(2, dim=-1)[0].sum(dim=-1)
        choice = choice.masked_fill(~self._group_mask(groups), float("-inf"))
        ids = torch.topk(choice, k=self.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, ids)
        if spec.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * spec.scaling, ids


def sparsemixer(scores: torch.Tensor, jitter_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Phi-3.5-MoE's top-2 routing in eval mode: each pick's weight is its softmax over the experts whose
    score lies within a relative ``2 * jitter_eps`` of the pick (the first pick excluded for the second)."""

    def pick(masked_scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        top, chosen = masked_scores.max(dim=-1, keepdim=True)
        factor = scores.abs().clamp(min=top)
        gates = masked_scores.masked_fill((top - scores) / factor > 2 * jitter_eps, float("-inf"))
        return torch.softmax(gates, dim=-1).gather(dim=-1, index=chosen), chosen

    first_weight, first = pick(scores)
    second_weight, second = pick(torch.scatter(scores, -1, first, float("-inf")))
    return torch.cat((first_weight, second_weight), dim=-1), torch.cat((first, second), dim=-1)


# --- experts and MLPs -----------------------------------------------------------------------------------

class MLP(nn.Module):
    """A dense SwiGLU MLP (dense layers, shared experts), gate and up fused."""

    def __init__(self, hidden: int, intermediate: int, bias: bool = False):
        super().__init__()
        self.gate_up = nn.Linear(hidden, 2 * intermediate, bias=bias)
        self.down = nn.Linear(intermediate, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Experts(nn.Module):
    """The routed experts of one layer, gate/up fused per expert: gate_up [E, 2I, H], down [E, H, I]."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        e, h, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.cfg = cfg
        self.gate_up = nn.Parameter(torch.empty(e, 2 * i, h))
        self.down = nn.Parameter(torch.empty(e, h, i))
        self.gate_up_bias = nn.Parameter(torch.zeros(e, 2 * i)) if cfg.expert_bias else None
        self.down_bias = nn.Parameter(torch.zeros(e, h)) if cfg.expert_bias else None

    def activation(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        if self.cfg.expert_act == "gpt_oss":
            limit = self.cfg.swiglu_limit
            gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
            return (up + 1) * (gate * torch.sigmoid(gate * self.cfg.swiglu_alpha))
        return F.silu(gate) * up

    def forward(self, x: torch.Tensor, weights: torch.Tensor,
                ids: torch.Tensor) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Run each activated expert once on its tokens -> (output [N, H], [(expert, tokens)] in expert order).

        Token slots are grouped by expert (in Python for a decode-sized batch: one host sync and no sort
        kernels), each expert runs one fused gate/up matmul and one down matmul, and the slots are put back in
        order and summed over top-k.
        """
        n, k = ids.shape
        if n * k <= 256:
            groups: dict[int, list[int]] = {}
            for slot, expert in enumerate(ids.reshape(-1).tolist()):
                groups.setdefault(expert, []).append(slot)
            plan = sorted(groups.items())
            order = torch.tensor([slot for _, slots in plan for slot in slots], device=x.device)
            counts = [(expert, len(slots)) for expert, slots in plan]
        else:
            flat = ids.reshape(-1)
            order = torch.argsort(flat, stable=True)
            counts = [(e, c) for e, c in enumerate(torch.bincount(flat, minlength=self.cfg.num_experts).tolist()) if c]
        xs = x.index_select(0, order // k)
        outs, start = [], 0
        for expert, count in counts:
            bias = None if self.gate_up_bias is None else self.gate_up_bias[expert]
            hidden = self.activation(F.linear(xs[start:start + count], self.gate_up[expert], bias))
            outs.append(F.linear(hidden, self.down[expert], None if self.down_bias is None else self.down_bias[expert]))
            start += count
        y = torch.cat(outs) * weights.reshape(-1).index_select(0, order).unsqueeze(-1).to(x.dtype)
        y = y.index_select(0, torch.argsort(order))
        return y.view(n, k, -1).sum(1), counts


class MoE(nn.Module):
    """Router, routed experts and the shared expert(s) some families add (Qwen2-MoE gates its own)."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.router = Router(cfg)
        self.experts = Experts(cfg)
        self.shared = MLP(cfg.hidden_size, cfg.shared_intermediate_size, cfg.mlp_bias) \
            if cfg.shared_intermediate_size else None
        self.shared_gate = nn.Linear(cfg.hidden_size, 1, bias=False) if cfg.shared_gate else None
