"""The embedded tiny MoE's GGUF, and llama.cpp's quantiser library call.

Checkpoints are converted by llama.cpp's own converter (``convert.py``). The
one exception is a checkpoint with capbench's own byte-level BPE tokenizer (the
embedded tiny MoE, and random-init models made from it), which the converter
does not recognise: for those few-MB Qwen3-MoE checkpoints this module writes
the F32 GGUF with the `gguf` package (llama.cpp's `qwen3moe` tensor names and
metadata keys). Quantised types of it come from llama.cpp's own quantiser
(`llama_model_quantize`), so the bits are what llama.cpp itself produces.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from capbench_core.analytics.checkpoint import read_config
from capbench_core.errors import CapbenchError

if TYPE_CHECKING:
    import numpy as np

# name -> llama.cpp file type (llama_ftype); f32 is written directly.
GGUF_TYPES: dict[str, str] = {
    "f32": "ALL_F32",
    "bf16": "MOSTLY_BF16",
    "f16": "MOSTLY_F16",
    "q8_0": "MOSTLY_Q8_0",
    "q4_k_m": "MOSTLY_Q4_K_M",
}


def _tensors(model_dir: Path) -> dict[str, np.ndarray]:
    import numpy as np
    from safetensors.numpy import load_file

    out: dict[str, np.ndarray] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        try:
            out.update(load_file(str(file)))
        except Exception:  # bf16 is not a numpy dtype: go through torch
            import torch
            from safetensors.torch import load_file as load_torch

            out.update({k: v.to(torch.float32).numpy() for k, v in load_torch(str(file)).items()})
    return {k: v.astype(np.float32) for k, v in out.items()}


def _tokenizer(writer: Any, model_dir: Path, eos_id: int) -> None:
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    model = tok["model"]
    if model.get("type") != "BPE":
        raise CapbenchError(f"{model_dir}/tokenizer.json: only byte-level BPE tokenizers can be exported to GGUF")
    vocab: dict[str, int] = dict(model["vocab"])
    special = {t["id"] for t in tok.get("added_tokens", []) if t.get("special")}
    for t in tok.get("added_tokens", []):
        vocab.setdefault(t["content"], t["id"])
    tokens = [""] * (max(vocab.values()) + 1)
    for text, idx in vocab.items():
        tokens[idx] = text
    merges = [" ".join(m) if isinstance(m, list) else m for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
    writer.add_token_merges(merges)
    writer.add_eos_token_id(eos_id)
    writer.add_bos_token_id(eos_id)
    writer.add_pad_token_id(eos_id)
    writer.add_add_bos_token(False)


def export_f32(model_dir: Path, out: Path) -> Path:
    """Write an F32 GGUF of a Qwen3-MoE checkpoint."""
    import gguf
    import numpy as np

    cfg = read_config(model_dir)
    if cfg.get("model_type") != "qwen3_moe":
        raise CapbenchError(f"GGUF export supports model_type qwen3_moe; {model_dir} is {cfg.get('model_type')!r}")
    t = _tensors(model_dir)
    layers, experts = int(cfg["num_hidden_layers"]), int(cfg["num_experts"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    w = gguf.GGUFWriter(str(tmp), "qwen3moe")
    w.add_name(model_dir.name)
    w.add_block_count(layers)
    w.add_context_length(int(cfg["max_position_embeddings"]))
    w.add_embedding_length(int(cfg["hidden_size"]))
    w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_head_count(int(cfg["num_attention_heads"]))
    w.add_head_count_kv(int(cfg["num_key_value_heads"]))
    w.add_key_length(int(cfg["head_dim"]))
    w.add_value_length(int(cfg["head_dim"]))
    w.add_rope_freq_base(float(cfg["rope_theta"]))
    w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    w.add_expert_count(experts)
    w.add_expert_used_count(int(cfg["num_experts_per_tok"]))
    w.add_expert_feed_forward_length(int(cfg["moe_intermediate_size"]))
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    _tokenizer(w, model_dir, int(cfg["eos_token_id"]))
    w.add_tensor("token_embd.weight", t["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", t["model.norm.weight"])
    if not cfg.get("tie_word_embeddings") and "lm_head.weight" in t:
        w.add_tensor("output.weight", t["lm_head.weight"])
    for i in range(layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        for ours, theirs in (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm"),
                             ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"),
                             ("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"),
                             ("self_attn.q_norm", "attn_q_norm"), ("self_attn.k_norm", "attn_k_norm"),
                             ("mlp.gate", "ffn_gate_inp")):
            w.add_tensor(f"{b}{theirs}.weight", t[f"{p}{ours}.weight"])
        for ours, theirs in (("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps"),
                             ("down_proj", "ffn_down_exps")):
            stacked = np.stack([t[f"{p}mlp.experts.{e}.{ours}.weight"] for e in range(experts)])
            w.add_tensor(f"{b}{theirs}.weight", stacked)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(out)
    return out


@contextmanager
def llama_log_to(path: Path) -> Iterator[None]:
    """llama.cpp's own log lines (C-level, otherwise on the terminal's stderr) go to ``path`` for the
    block; llama-cpp-python's handler is put back afterwards."""
    import ctypes

    import llama_cpp
    import llama_cpp._logger as default

    log = open(path, "a", buffering=1)

    @llama_cpp.llama_log_callback  # type: ignore[misc]
    def write(level: int, text: bytes, user_data: Any) -> None:
        log.write(text.decode("utf-8", errors="replace"))

    llama_cpp.llama_log_set(write, ctypes.c_void_p(0))
    try:
        yield
    finally:
        llama_cpp.llama_log_set(default.llama_log_callback, ctypes.c_void_p(0))
        log.close()


def quantize(src: Path, out: Path, gguf_type: str, threads: int = 0) -> Path:
    """Quantise an F32 GGUF with llama.cpp's own quantiser (its log goes next to the output)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{GGUF_TYPES[gguf_type]}")
    params.nthread = threads
    tmp = out.with_suffix(".tmp")
    log = out.with_suffix(".quantize.log")
    with llama_log_to(log):
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
    if rc != 0:
        raise CapbenchError(f"llama.cpp could not quantise {src} to {gguf_type} (return code {rc}; log: {log})")
    tmp.replace(out)
    return out
