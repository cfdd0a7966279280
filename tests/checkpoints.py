"""Small random-weight checkpoints of real MoE architectures, built here (nothing downloaded).

Each is its published config.json (plugins/capbench_models/configs) with widths and depth shrunk and vocabulary,
routing (experts, top-k, shared experts, dense layers) and dtype kept, random bf16 weights, saved sharded by the
installed transformers (so its config is written the way transformers of today writes it), with a real
tokenizer read from one of the vocab-only GGUFs llama.cpp ships in its models/ directory.

They are cached under the user cache directory by (architecture, transformers version, recipe version): a
rebuild takes seconds, and their GGUF conversions are cached by capbench itself.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capbench_models import PUBLISHED_CONFIGS

RECIPE = 6  # bump when the shrinking below changes: the cache key changes with it
CONFIGS = PUBLISHED_CONFIGS
# Heads of 64: vLLM's CPU attention has kernels for common head sizes only (16 is refused). A config that
# states head_dim keeps stating it (64); one that does not keeps hidden_size / heads = 64, the only head size
# engines that ignore head_dim (llama.cpp's and SGLang's Qwen2-MoE) can load.
SMALL = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
         "max_position_embeddings": 4096}


@dataclass(frozen=True)
class Arch:
    """One architecture of the matrix: its published config, the vocab it is served with, how it shrinks."""

    name: str
    config: str
    vocab: str
    shrink: dict[str, Any] = field(default_factory=dict)
    #: also write tokenizer.model (SentencePiece): llama.cpp's converter reads the Phi vocabulary from it
    sentencepiece: bool = False


ARCHS = {
    "qwen3_moe": Arch("qwen3_moe", "qwen3-30b-a3b.json", "qwen2", {"intermediate_size": 128,
                                                                     "moe_intermediate_size": 32}),
    "mixtral": Arch("mixtral", "mixtral-8x7b.json", "llama-spm", {"intermediate_size": 64}),
    "qwen2_moe": Arch("qwen2_moe", "qwen1.5-moe-a2.7b.json", "qwen2",
                      {"intermediate_size": 128, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64,
                       "num_key_value_heads": 2}),
    # MLA's head dimensions stay the published ones (kernels exist for those only), and so do its 27 layers
    # (llama.cpp tells DeepSeek-V2-Lite, which has no q_lora_rank, by its depth). The deepseek-llm vocab GGUF,
    # rebuilt into a tokenizer by transformers, is not a pre-tokenizer llama.cpp's converter recognises: GPT-2's
    # BPE stands in, with DeepSeek-V2-Lite's 102,400 embedding rows kept (more rows than tokens, as in real
    # checkpoints). Its YaRN RoPE scaling is the published one.
    "deepseek_v2": Arch("deepseek_v2", "deepseek-v2-lite.json", "gpt-2",
                        {"intermediate_size": 128, "moe_intermediate_size": 32, "num_key_value_heads": 2,
                         "num_hidden_layers": 27, "max_position_embeddings": 163840,
                         "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707,
                                          "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096,
                                          "type": "yarn"}}),
    "phimoe": Arch("phimoe", "phi-3.5-moe-instruct.json", "phi-3", {"intermediate_size": 64}, sentencepiece=True),
}


def cache_root() -> Path:
    from platformdirs import user_cache_dir

    return Path(os.environ.get("CAPBENCH_TEST_CHECKPOINTS") or Path(user_cache_dir("capbench")) / "test-checkpoints")


def shrunk_config(arch: Arch) -> dict[str, Any]:
    """The published config with its widths and depth shrunk; RoPE scaling factors cut to the new head size."""
    config: dict[str, Any] = json.loads((CONFIGS / arch.config).read_text())
    config.update(SMALL)
    if "head_dim" in config:
        config["head_dim"] = 64
    config.update(arch.shrink)
    scaling = config.get("rope_scaling")
    if isinstance(scaling, dict):
        half = int(config["head_dim"] if "head_dim" in config else config["hidden_size"] // config[
            "num_attention_heads"]) // 2
        for key in ("short_factor", "long_factor"):
            if isinstance(scaling.get(key), list):
                scaling[key] = scaling[key][:half]
    if config.get("first_k_dense_replace"):
        config["first_k_dense_replace"] = 1  # one dense layer, then MoE layers
    return config


def build(name: str) -> Path:
    """The checkpoint directory of one architecture, built once per (recipe, transformers version)."""
    import transformers

    arch = ARCHS[name]
    out = cache_root() / f"{name}-r{RECIPE}-tf{transformers.__version__}"
    if (out / "done").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    _save(arch, out)
    (out / "done").write_text("ok")
    return out


def _save(arch: Arch, out: Path) -> None:
    import torch
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM, AutoTokenizer

    from capbench_llamacpp.convert import vocab_gguf

    config = shrunk_config(arch)
    cls = CONFIG_MAPPING[config["model_type"]]
    hf_config = cls(**{k: v for k, v in config.items() if k not in ("model_type", "architectures", "auto_map")})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.bfloat16)
    model.save_pretrained(out, max_shard_size="8MB")
    vocab = vocab_gguf(arch.vocab)
    tokenizer = AutoTokenizer.from_pretrained(vocab.parent, gguf_file=vocab.name)
    tokenizer.save_pretrained(out)
    if arch.sentencepiece:
        _sentencepiece_model(vocab, out / "tokenizer.model")


def _sentencepiece_model(vocab: Path, out: Path) -> None:
    """A SentencePiece model of a llama-style vocab GGUF: its pieces, scores and types up to the first added
    token (the added ones live in tokenizer.json, as in the original checkpoints)."""
    import gguf
    from sentencepiece import sentencepiece_model_pb2 as spm

    fields = gguf.GGUFReader(str(vocab)).fields
    tokens, scores, types = (fields[f"tokenizer.ggml.{k}"].contents() for k in ("tokens", "scores", "token_type"))
    model = spm.ModelProto()
    model.trainer_spec.model_type = spm.TrainerSpec.BPE
    model.trainer_spec.byte_fallback = True
    model.trainer_spec.unk_id, model.trainer_spec.bos_id, model.trainer_spec.eos_id = 0, 1, 2
    model.trainer_spec.pad_id = -1
    model.normalizer_spec.name = "identity"
    model.normalizer_spec.add_dummy_prefix = True
    model.normalizer_spec.remove_extra_whitespaces = False
    model.normalizer_spec.escape_whitespaces = True
    base = len(tokens)
    while base > 3 and types[base - 1] in (3, 4):  # trailing control / user-defined tokens: the added ones
        base -= 1
    unknown, control, normal = spm.ModelProto.SentencePiece.UNKNOWN, spm.ModelProto.SentencePiece.CONTROL, 1
    for i, (token, score, kind) in enumerate(zip(tokens[:base], scores[:base], types[:base])):
        piece = model.pieces.add()
        # GGUF's type numbers are SentencePiece's; the one UNKNOWN piece is id 0, bos/eos are CONTROL
        kind = unknown if i == 0 else control if i in (1, 2) else normal if kind == unknown else int(kind)
        piece.piece, piece.score, piece.type = str(token), float(score), kind
    out.write_bytes(model.SerializeToString())
