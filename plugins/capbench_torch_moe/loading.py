"""Hugging Face checkpoints in and out of :class:`MoETransformer`.

:func:`checkpoint_slots` names, for one model, every checkpoint tensor it reads and where it goes (a
parameter or a slice of a fused one, with the reshaping some layouts need). :func:`load_hf` builds the
model empty in the asked dtype, then streams the safetensors files tensor by tensor into it: peak memory is
the model plus one tensor. Every tensor must be used and every slot filled, or loading stops with the name.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from capbench_core.analytics.checkpoint import read_config, safetensors_header, weight_files
from capbench_core.errors import CapbenchError
from capbench_torch_moe.arch import MoEConfig
from capbench_torch_moe.layers import MLP, Attention, LatentAttention, Norm
from capbench_torch_moe.model import Block, MoETransformer

#: Checkpoint tensors that hold nothing a forward pass reads (old RoPE caches saved as buffers).
IGNORED = re.compile(r"\.rotary_emb\.inv_freq$")
LAYER = re.compile(r"^model\.layers\.(\d+)\.")
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


@dataclass
class Slot:
    """Where one checkpoint tensor goes: ``target`` (a parameter or a view of one), after ``convert``."""

    target: torch.Tensor
    convert: Callable[[torch.Tensor], torch.Tensor] | None = None


def _norm(prefix: str, norm: Norm) -> Iterator[tuple[str, Slot]]:
    yield prefix + ".weight", Slot(norm.weight)
    if norm.bias is not None:
        yield prefix + ".bias", Slot(norm.bias)


def _linear(prefix: str, linear: torch.nn.Linear) -> Iterator[tuple[str, Slot]]:
    yield prefix + ".weight", Slot(linear.weight)
    if linear.bias is not None:
        yield prefix + ".bias", Slot(linear.bias)


def _fused(prefixes: list[str], linear: torch.nn.Linear, sizes: list[int]) -> Iterator[tuple[str, Slot]]:
    """Rows of one fused linear (q/k/v, gate/up) that the checkpoint stores as separate linears."""
    for prefix, weight in zip(prefixes, linear.weight.split(sizes, dim=0)):
        yield prefix + ".weight", Slot(weight)
    if linear.bias is not None:
        for prefix, bias in zip(prefixes, linear.bias.split(sizes, dim=0)):
            yield prefix + ".bias", Slot(bias)


def _mlp(prefix: str, mlp: MLP) -> Iterator[tuple[str, Slot]]:
    half = mlp.gate_up.out_features // 2
    yield from _fused([prefix + ".gate_proj", prefix + ".up_proj"], mlp.gate_up, [half, half])
    yield from _linear(prefix + ".down_proj", mlp.down)


def _attention(p: str, attn: Attention | LatentAttention) -> Iterator[tuple[str, Slot]]:
    if isinstance(attn, LatentAttention):
        if attn.mla.q_lora_rank is None:
            yield from _linear(p + "q_proj", attn.q_proj)
        else:
            yield from _linear(p + "q_a_proj", attn.q_a_proj)
            yield from _norm(p + "q_a_layernorm", attn.q_a_norm)
            yield from _linear(p + "q_b_proj", attn.q_b_proj)
        yield from _linear(p + "kv_a_proj_with_mqa", attn.kv_a_proj)
        yield from _norm(p + "kv_a_layernorm", attn.kv_a_norm)
        yield from _linear(p + "kv_b_proj", attn.kv_b_proj)
        yield from _linear(p + "o_proj", attn.o_proj)
        return
    yield from _fused([p + "q_proj", p + "k_proj", p + "v_proj"], attn.qkv_proj, attn.splits)
    yield from _linear(p + "o_proj", attn.o_proj)
    if attn.q_norm is not None and attn.k_norm is not None:
        yield from _norm(p + "q_norm", attn.q_norm)
        yield from _norm(p + "k_norm", attn.k_norm)
    if attn.sinks is not None:
        yield p + "sinks", Slot(attn.sinks)


def _deinterleave(rows: torch.Tensor) -> torch.Tensor:
    """gpt-oss stores gate and up interleaved (gate_0, up_0, gate_1, ...) along dim 1; ours are halves."""
    return torch.cat((rows[:, 0::2], rows[:, 1::2]), dim=1)


def _moe(cfg: MoEConfig, p: str, block: Block) -> Iterator[tuple[str, Slot]]:
    moe = block.moe
    assert moe is not None
    experts = moe.experts
    if cfg.model_type == "gpt_oss":
        yield p + "mlp.router.weight", Slot(moe.router.weight)
        yield p + "mlp.router.bias", Slot(moe.router.bias)
        # [E, H, 2I] interleaved -> [E, 2I, H] halves; [E, I, H] -> [E, H, I]
        yield p + "mlp.experts.gate_up_proj", Slot(experts.gate_up, lambda w: _deinterleave(w.transpose(1, 2)))
        yield p + "mlp.experts.gate_up_proj_bias", Slot(experts.gate_up_bias, _deinterleave)
        yield p + "mlp.experts.down_proj", Slot(experts.down, lambda w: w.transpose(1, 2))
        yield p + "mlp.experts.down_proj_bias", Slot(experts.down_bias)
        return
    mixtral_style = cfg.model_type in ("mixtral", "phimoe")
    base = p + ("block_sparse_moe." if mixtral_style else "mlp.")
    gate_n, up_n, down_n = ("w1", "w3", "w2") if mixtral_style else ("gate_proj", "up_proj", "down_proj")
    yield base + "gate.weight", Slot(moe.router.weight)
    if moe.router.correction is not None:
        yield base + "gate.e_score_correction_bias", Slot(moe.router.correction)
    inter = cfg.moe_intermediate_size
    for e in range(cfg.num_experts):
        yield f"{base}experts.{e}.{gate_n}.weight", Slot(experts.gate_up[e, :inter])
        yield f"{base}experts.{e}.{up_n}.weight", Slot(experts.gate_up[e, inter:])
        yield f"{base}experts.{e}.{down_n}.weight", Slot(experts.down[e])
    if moe.shared is not None:
        yield from _mlp(base + ("shared_expert" if cfg.shared_gate else "shared_experts"), moe.shared)
    if moe.shared_gate is not None:
        yield from _linear(base + "shared_expert_gate", moe.shared_gate)


def checkpoint_slots(model: MoETransformer) -> dict[str, Slot]:
    """Every tensor name of the Hugging Face layout of ``model``'s family -> where it goes."""
    cfg = model.cfg
    slots: dict[str, Slot] = {"model.embed_tokens.weight": Slot(model.embed.weight)}
    slots.update(_norm("model.norm", model.final_norm))
    if model.lm_head is not None:
        slots.update(_linear("lm_head", model.lm_head))
    for i, block in enumerate(model.blocks):
        p = f"model.layers.{i}."
        slots.update(_norm(p + "input_layernorm", block.input_norm))
        slots.update(_norm(p + "post_attention_layernorm", block.post_attn_norm))
        slots.update(_attention(p + "self_attn.", block.attn))
        if block.mlp is not None:
            slots.update(_mlp(p + "mlp", block.mlp))
        else:
            slots.update(_moe(cfg, p, block))
    return slots


def to_hf_state_dict(model: MoETransformer) -> dict[str, torch.Tensor]:
    """The model's weights under the Hub's names (what from_pretrained and the engines read)."""
    out = {}
    for name, slot in checkpoint_slots(model).items():
        if slot.convert is not None:
            raise CapbenchError(f"torch_moe does not write {model.cfg.model_type} checkpoints ({name} is "
                                f"stored in another layout)")
        out[name] = slot.target.detach().contiguous()
    return out


# --- reading ------------------------------------------------------------------------------------------

#: safetensors dtype names -> torch dtypes
TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def _tensors(model_dir: Path) -> Iterator[tuple[str, Path, Callable[[], torch.Tensor]]]:
    """(name, file, read) for every tensor of every shard; read() loads just that tensor.

    Tensors are read with plain file reads rather than safetensors' memory map: a mapped shard's pages stay
    resident until the shard is closed, which would add a whole shard (the whole model, unsharded) to the
    loading peak.
    """
    files = weight_files(model_dir)
    if not files:
        raise CapbenchError(f"no *.safetensors weights in {model_dir}")
    for file in files:
        if not file.is_file():
            raise CapbenchError(f"{model_dir}: the safetensors index lists {file.name}, which is missing")
        header = safetensors_header(file)
        with file.open("rb") as f:
            base = 8 + int.from_bytes(f.read(8), "little")  # data starts after the length and the header
            for name, info in header.items():
                if name != "__metadata__":
                    yield name, file, lambda f=f, base=base, info=info, file=file: _read(f, base, info, file)


def _read(f: BinaryIO, base: int, info: dict[str, Any], file: Path) -> torch.Tensor:
    dtype = TORCH_DTYPES.get(info["dtype"])
    if dtype is None:
        raise CapbenchError(f"{file}: tensor dtype {info['dtype']} is not one torch_moe reads")
    start, end = info["data_offsets"]
    buffer = bytearray(end - start)
    f.seek(base + start)
    if f.readinto(buffer) != len(buffer):
        raise CapbenchError(f"{file} is truncated (a tensor ends past the end of the file)")
    if not buffer:
        return torch.empty(info["shape"], dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype).reshape(info["shape"])


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """MXFP4 [.., rows, G, 16] packed nibbles with one power-of-two scale per 32 values -> [.., rows, G * 32]."""
    lut = torch.tensor(FP4_VALUES, dtype=dtype)
    blocks = blocks.to(torch.uint8)
    out = torch.empty(*blocks.shape[:-1], blocks.shape[-1] * 2, dtype=dtype)
    out[..., 0::2] = lut[(blocks & 0x0F).int()]
    out[..., 1::2] = lut[(blocks >> 4).int()]
    out = torch.ldexp(out, (scales.to(torch.int32) - 127).unsqueeze(-1).to(dtype))
    return out.reshape(*blocks.shape[:-2], -1)


class _Filler:
    """Copies tensors into their slots, tracking which slots are filled and pairing MXFP4 blocks/scales."""

    def __init__(self, model: MoETransformer, model_dir: Path):
        self.model_dir = model_dir
        self.slots = checkpoint_slots(model)
        self.filled: set[str] = set()
        self.pending: dict[str, dict[str, torch.Tensor]] = {}
        cfg = model.cfg
        #: DeepSeek-V3's multi-token-prediction layers follow the decoder's; they are not part of decoding
        self.extra_layers = range(cfg.num_layers, cfg.num_layers + cfg.extra_layers)
        self.tied = cfg.tie_word_embeddings

    def take(self, name: str, file: Path, read: Callable[[], torch.Tensor]) -> None:
        layer = LAYER.match(name)
        if IGNORED.search(name) or (layer and int(layer[1]) in self.extra_layers) or (
                self.tied and name == "lm_head.weight"):
            return
        if name.endswith(("_blocks", "_scales")):
            base, part = name.rsplit("_", 1)
            if base in self.slots:
                parts = self.pending.setdefault(base, {})
                parts[part] = read()
                if len(parts) == 2:
                    # [E, rows, K] as quantized -> [E, K, rows], the unquantized checkpoint's layout
                    tensor = dequantize_mxfp4(parts["blocks"], parts["scales"], torch.float32).transpose(1, 2)
                    del self.pending[base]
                    self.copy(base, tensor)
                return
        if name not in self.slots:
            raise CapbenchError(f"{file}: tensor '{name}' is not part of torch_moe's {self.model_dir.name} model "
                                f"as config.json describes it (a part torch_moe does not implement, or a config "
                                f"that does not match the weights)")
        self.copy(name, read())

    def copy(self, name: str, tensor: torch.Tensor) -> None:
        slot = self.slots[name]
        if slot.convert is not None:
            tensor = slot.convert(tensor)
        if tuple(tensor.shape) != tuple(slot.target.shape):
            raise CapbenchError(f"{self.model_dir}: weight '{name}' has shape {tuple(tensor.shape)}, config.json "
                                f"implies {tuple(slot.target.shape)}")
        with torch.no_grad():
            slot.target.copy_(tensor)
        self.filled.add(name)

    def finish(self) -> None:
        missing = sorted(set(self.slots) - self.filled)
        if self.pending:
            missing += [f"{base}_{'scales' if 'blocks' in parts else 'blocks'}" for base, parts in self.pending.items()]
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise CapbenchError(f"{self.model_dir}: weight(s) {', '.join(missing[:5])}{more} missing from the "
                                f"safetensors files")


def load_hf(model_dir: Path, dtype: torch.dtype = torch.float32, max_positions: int | None = None,
            device: str | torch.device = "cpu") -> MoETransformer:
    """Load a Hub-layout checkpoint (config.json + *.safetensors) into MoETransformer, in ``dtype`` on
    ``device``, one tensor at a time."""
    cfg = MoEConfig.from_hf(read_config(model_dir))
    with torch.device("meta"):
        model = MoETransformer(cfg, max_positions).to(dtype)
        for block in model.blocks:
            if block.moe is not None and cfg.router.float32:
                block.moe.router.float()
    model = model.to_empty(device=device)
    filler = _Filler(model, model_dir)
    for name, file, read in _tensors(model_dir):
        filler.take(name, file, read)
    filler.finish()
    model.eval()
    model.requires_grad_(False)
    return model
